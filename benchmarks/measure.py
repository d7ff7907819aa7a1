"""Measurements: machine facts, the dense-matmul peak, peak resident memory, and interleaved
step timing (A B A B ...: each round runs every contender in turn, so load from other
processes falls on all of them alike)."""
from __future__ import annotations

import ctypes
import datetime
import os
import platform
import resource
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

# Dense bf16 peak FLOP/s of known chips (vendor figures, no sparsity), by device_kind substring;
# the first match wins, so 'TPU v5 lite' precedes 'TPU v5'.
CHIP_PEAKS = (('TPU v6 lite', 918e12), ('TPU v6e', 918e12), ('TPU v5 lite', 197e12),
              ('TPU v5e', 197e12), ('TPU v5p', 459e12), ('TPU v5', 459e12), ('TPU v4', 275e12),
              ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12))


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  import flax
  import jaxlib
  import transformers
  device = jax.devices()[0]
  return {
      'cpu': cpu_model(), 'cores': os.cpu_count(), 'backend': jax.default_backend(),
      'device_kind': device.device_kind, 'devices': jax.device_count(),
      'torch_threads': torch.get_num_threads(), 'python': platform.python_version(),
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
      'torch': torch.__version__, 'transformers': transformers.__version__,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'load_average': os.getloadavg(),
  }


def chip_peak(device_kind: str) -> float | None:
  """Known dense bf16 peak FLOP/s of an accelerator, or None."""
  return next((peak for kind, peak in CHIP_PEAKS if kind.lower() in device_kind.lower()), None)


def timed(fn: Callable[[], object]) -> float:
  """Seconds `fn()` takes (it must return when its work is done)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _best_rate(fn: Callable[[], object], flops: float, reps: int) -> float:
  fn()   # compile / warm up
  return flops / min(timed(fn) for _ in range(reps))


def torch_flops(fn: Callable[[], object]) -> float:
  """FLOPs torch.utils.flop_counter counts in `fn()` (matmuls, convolutions, attention)."""
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    fn()
  return float(counter.get_total_flops())


def matmul_peak(n: int = 2048, reps: int = 5, dtype: str = 'float32') -> dict:
  """Best FLOP/s of an n x n x n matmul in JAX (jnp.dot, jitted) and, on CPU, torch.mm; 'peak'
  is the higher: the machine's measured dense-matmul peak."""
  a = jnp.asarray(np.random.RandomState(0).rand(n, n), dtype)
  dot = jax.jit(jnp.dot)
  out = {'n': n, 'dtype': dtype,
         'jax': _best_rate(lambda: dot(a, a).block_until_ready(), 2 * n ** 3, reps)}
  if jax.default_backend() == 'cpu':
    t = torch.from_numpy(np.array(a, np.float32))
    out['torch'] = _best_rate(lambda: torch.mm(t, t), 2 * n ** 3, reps)
  out['peak'] = max(v for k, v in out.items() if k in ('jax', 'torch'))
  return out


def best_peak(*measurements: dict) -> dict:
  """The best of several `matmul_peak` measurements, each kept under 'measurements'."""
  best = {k: max(m[k] for m in measurements) for k in ('jax', 'torch', 'peak')
          if k in measurements[0]}
  return {'n': measurements[0]['n'], 'dtype': measurements[0]['dtype'], **best,
          'measurements': list(measurements)}


class Memory:
  """Peak resident memory between `reset()` and `peak()`: VmHWM after writing 5 to
  /proc/self/clear_refs; without that, getrusage's lifetime maximum (never reset). `reset`
  first hands memory freed by earlier steps back to the OS (glibc malloc_trim), so the
  resident memory before a step is what is live, for kivfm and torch alike."""

  def __init__(self):
    try:
      self._trim = ctypes.CDLL('libc.so.6').malloc_trim
    except (OSError, AttributeError):
      self._trim = lambda pad: None
    try:
      self._clear()
      self.method = 'VmHWM (reset per variant via /proc/self/clear_refs)'
    except OSError:
      self.method = 'getrusage ru_maxrss (lifetime peak, cannot be reset)'

  @staticmethod
  def _clear():
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')

  @staticmethod
  def _status(key: str) -> float:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(key + ':'):
          return int(line.split()[1]) / 1024   # kB -> MB
    raise KeyError(key)

  def reset(self) -> None:
    self._trim(0)
    if self.method.startswith('VmHWM'):
      self._clear()

  def current(self) -> float:
    """Resident memory now (MB)."""
    try:
      return self._status('VmRSS')
    except (OSError, KeyError):
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  def peak(self) -> float:
    """Peak resident memory since `reset` (MB)."""
    if self.method.startswith('VmHWM'):
      return self._status('VmHWM')
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleave(steps: dict[str, Callable[[], object]], rounds: int, per_round: int,
               memory: Memory, deadline: float, log: Callable[[str], None] = print) -> dict:
  """name -> {'times': [wall s per step], 'cpu_times': [process CPU s per step, all threads],
  'rss_mb': [[before, peak] per round]}. Each round runs `per_round` steps of every contender
  in turn; at least 2 rounds, at most `rounds`, and no round that would end after `deadline`
  (time.perf_counter) judging by the last one."""
  out = {name: {'times': [], 'cpu_times': [], 'rss_mb': []} for name in steps}
  for r in range(rounds):
    round_start = time.perf_counter()
    for name, step in steps.items():
      memory.reset()
      before = memory.current()
      for _ in range(per_round):
        cpu = time.process_time()
        out[name]['times'].append(timed(step))
        out[name]['cpu_times'].append(time.process_time() - cpu)
      out[name]['rss_mb'].append([before, memory.peak()])
      log(f'  round {r + 1} {name}: {statistics.median(out[name]["times"][-per_round:]):.2f} '
          f's/step')
    now = time.perf_counter()
    if r + 1 >= 2 and now + (now - round_start) > deadline:
      break
  return out


def summary(times: list[float], cpu_times: list[float], batch: int) -> dict:
  """Median and range of step times and images/s, and the median CPU time of a step (all
  threads: on a busy machine wall time grows, CPU time much less)."""
  med = statistics.median(times)
  return {'step_s': med, 'step_s_min': min(times), 'step_s_max': max(times),
          'images_per_s': batch / med, 'images_per_s_min': batch / max(times),
          'images_per_s_max': batch / min(times), 'cpu_s': statistics.median(cpu_times)}
