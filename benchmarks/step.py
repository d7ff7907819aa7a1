"""kivfm's train step against a PyTorch peer of the same algorithm, and kivfm's own options:

  python -m benchmarks.step [--quick] [--out=benchmarks/results] [--groups=compare,options]

The algorithm (`benchmarks.kivfm_side.make_config`, `benchmarks.torch_peer`): student = frozen
DINOv2 ViT-S/14 + bottleneck adapters of width 64 in every block; teachers = that DINOv2
(knowledge base) and EfficientNet-Lite0, random weights, each fed the view at the view's size;
2-layer s2t heads of width 1024 in the teacher space; cos + smooth-L1 on patches, cosine on
global vectors, preservation term; AdamW; fp32; synthetic uint8 images.
Groups, each timed interleaved in this one process (every round runs each contender in turn,
after its first call, which compiles and warms up):
  compare B32 112px, compare B64 224px   kivfm vs torch eager (and torch.compile at B32 112 px);
  compare bf16 B32 112px   kivfm in bf16 vs torch eager under bf16 autocast (CPU only);
  options     kivfm at B32 112 px: online vs cached teachers, fp32 vs bf16, remat, adapters in
              the last 4 blocks only (`config.student.adapter_blocks`); an option kivfm cannot
              run (yet), or that changes nothing, is skipped with the reason as a note;
  batch       kivfm at 112 px, batch 8, 16, 32, 64;   resolution   kivfm at B32, 112, 168, 224 px.
Rounds stop early (never below 2) when a group would overrun its share of the time budget.
Writes OUT/step_benchmark.json (machine, matmul peak, every variant with its raw step times) and
OUT/step_benchmark.png; prints a markdown table and the kivfm / torch speed ratio per shape.
--quick: DINOv2 'tiny-dino' (2 blocks, width 32), heads of width 32, 32-64 px, 2 rounds, no
torch.compile (used by tests/test_benchmarks.py; its time is the kivfm compilations).
Full run: a time budget of 19 minutes on 2 CPU cores, overrun when the machine is busy.
On GPU / TPU kivfm runs in bf16 and utilisation is also given against the chip's known peak;
the peer runs on CPU only, so the torch rows are skipped there.
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import shutil
import tempfile
import time

import jax
import numpy as np
import torch

from benchmarks import kivfm_side, measure, report, torch_peer
from kivfm import allocator


@dataclasses.dataclass(frozen=True)
class Spec:
  """One contender: a framework on a batch of `batch` views of `size` px, with options."""
  framework: str                # kivfm | torch | torch.compile
  batch: int
  size: int
  dtype: str = 'float32'
  cached: bool = False
  remat: bool = False
  adapter_blocks: int = 0
  trunk: bool = False           # cached: the student's trunk too (config.cache.student_trunk)

  @property
  def name(self) -> str:
    if self.framework != 'kivfm':
      return f'{self.framework} ' + ('bf16 autocast' if self.dtype == 'bfloat16' else 'fp32')
    parts = ['kivfm', ('cached+trunk' if self.trunk else 'cached') if self.cached else 'online',
             'bf16' if self.dtype == 'bfloat16' else 'fp32']
    parts += ['remat'] if self.remat else []
    parts += [f'last {self.adapter_blocks} blocks'] if self.adapter_blocks else []
    return ' '.join(parts)

  @property
  def label(self) -> str:
    return f'{self.name} B{self.batch} {self.size}px'


@dataclasses.dataclass(frozen=True)
class Plan:
  kb: str                       # registry name of the DINOv2 student / knowledge base
  hidden: int                   # s2t head width
  compare: tuple                # (batch, size) of each kivfm vs torch comparison
  options: tuple                # (batch, size) of kivfm's option variants
  adapter_blocks: int
  batches: tuple                # batch scaling at `batch_size_px`
  batch_size_px: int
  sizes: tuple                  # resolution scaling at batch `sizes_batch`
  sizes_batch: int
  rounds: int                   # at most; at least 2
  steps: int                    # per contender per round
  budget_s: float
  torch_compile: tuple          # (batch, size) of the comparisons that also run torch.compile


FULL = Plan(kb=kivfm_side.STUDENT, hidden=1024, compare=((32, 112), (64, 224)), options=(32, 112),
            adapter_blocks=4, batches=(8, 16, 32, 64), batch_size_px=112, sizes=(112, 168, 224),
            sizes_batch=32, rounds=5, steps=1, budget_s=1140, torch_compile=((32, 112),))
QUICK = Plan(kb='tiny-dino', hidden=32, compare=((8, 32), (8, 64)), options=(8, 32),
             adapter_blocks=1, batches=(8,), batch_size_px=32, sizes=(32,), sizes_batch=8,
             rounds=2, steps=2, budget_s=30, torch_compile=())


def groups(plan: Plan, accelerator: bool) -> list[tuple[str, list[Spec]]]:
  dtype, other = ('bfloat16', 'float32') if accelerator else ('float32', 'bfloat16')
  kivfm = lambda batch, size, **kw: Spec('kivfm', batch, size, kw.pop('dtype', dtype), **kw)
  out = []
  for b, s in plan.compare:
    peers = [] if accelerator else [Spec('torch', b, s)] + (
        [Spec('torch.compile', b, s)] if (b, s) in plan.torch_compile else [])
    out.append((f'compare B{b} {s}px', [kivfm(b, s)] + peers))
  if not accelerator:   # mixed precision on both sides (AMX / AVX512-BF16 where the CPU has it)
    b, s = plan.compare[0]
    out.append((f'compare bf16 B{b} {s}px', [kivfm(b, s, dtype='bfloat16'),
                                             Spec('torch', b, s, 'bfloat16')]))
  b, s = plan.options
  last = plan.adapter_blocks
  out.append(('options', [kivfm(b, s), kivfm(b, s, cached=True), kivfm(b, s, dtype=other),
                          kivfm(b, s, remat=True), kivfm(b, s, adapter_blocks=last),
                          kivfm(b, s, cached=True, adapter_blocks=last),
                          kivfm(b, s, cached=True, trunk=True, adapter_blocks=last)]))
  out.append(('batch', [kivfm(x, plan.batch_size_px) for x in plan.batches]))
  out.append(('resolution', [kivfm(plan.sizes_batch, x) for x in plan.sizes]))
  return out


def select(plan_groups: list, wanted: str) -> list:
  """The groups whose name starts with one of the comma-separated `wanted` (all if empty)."""
  prefixes = [w.strip() for w in wanted.split(',') if w.strip()]
  chosen = [g for g in plan_groups if not prefixes or g[0].startswith(tuple(prefixes))]
  if not chosen:
    names = ', '.join(name for name, _ in plan_groups)
    raise SystemExit(f'--groups={wanted!r} matches no group; groups: {names}')
  return chosen


class Skipped(Exception):
  """A variant that cannot run here; its message says why."""


@dataclasses.dataclass
class Contender:
  spec: Spec
  step: object                  # () -> one train step, finished when it returns
  trainable_params: int
  first_call_s: float           # compile (kivfm, torch.compile) + the first step
  xla: dict | None = None       # kivfm: XLA's FLOPs and temporary bytes of the compiled step
  torch_flops_per_image: float | None = None


class Bench:
  """Builds contenders once (a spec used by several groups is the same object) and shares a
  kivfm run between variants of one model (cached teachers, other batch sizes)."""

  def __init__(self, plan: Plan, dtype: str, log):
    self.plan, self.dtype, self.log = plan, dtype, log   # dtype: kivfm's main compute dtype
    self.contenders: dict[Spec, Contender] = {}
    self.runs: dict[tuple, object] = {}   # (size, dtype, remat, adapter_blocks) -> Run

  @staticmethod
  def images(batch: int, size: int) -> np.ndarray:
    return np.random.RandomState(batch * 1000 + size).randint(
        0, 256, (batch, size, size, 3), dtype=np.uint8)

  def config(self, spec: Spec):
    return kivfm_side.make_config(spec.batch, spec.size, kb=self.plan.kb, hidden=self.plan.hidden,
                                  dtype=spec.dtype, remat=spec.remat,
                                  adapter_blocks=spec.adapter_blocks, student_trunk=spec.trunk)

  def get(self, spec: Spec) -> Contender:
    if spec not in self.contenders:
      start = time.perf_counter()
      build = self._kivfm if spec.framework == 'kivfm' else self._torch
      self.contenders[spec] = build(spec)
      self.log(f'  built {spec.label} in {time.perf_counter() - start:.0f} s')
    return self.contenders[spec]

  def _kivfm(self, spec: Spec) -> Contender:
    """The step of `spec`. An option variant kivfm cannot run (yet) is skipped with the reason;
    the plain step must run."""
    try:
      return self._kivfm_step(spec)
    except Skipped:
      raise
    except Exception as error:  # noqa: BLE001
      if not (spec.cached or spec.remat or spec.adapter_blocks or spec.dtype != self.dtype):
        raise
      first_line = str(error).strip().split('\n')[0][:300]
      raise Skipped(f'kivfm fails: {type(error).__name__}: {first_line}') from error

  def _kivfm_step(self, spec: Spec) -> Contender:
    config = self.config(spec)
    key = (spec.size, spec.dtype, spec.remat, spec.adapter_blocks)
    step = kivfm_side.KivfmStep(config, self.images(spec.batch, spec.size), cached=spec.cached,
                                run=self.runs.get(key))
    self.runs[key] = step.run
    if spec.adapter_blocks:
      every_block = self.get(dataclasses.replace(spec, adapter_blocks=0, cached=False,
                                                 trunk=False))
      if step.trainable_params == every_block.trainable_params:
        raise Skipped('config.student.adapter_blocks changes nothing yet (as many trainable '
                      'parameters as with adapters in every block)')
    first = measure.timed(step)
    return Contender(spec, step, step.trainable_params, first, xla=step.cost())

  def _torch(self, spec: Spec) -> Contender:
    recipe = kivfm_side.recipe(self.config(dataclasses.replace(spec, framework='kivfm')))
    trainer = torch_peer.Trainer(recipe, compile=spec.framework == 'torch.compile',
                                 autocast=spec.dtype == 'bfloat16')
    images = torch.from_numpy(self.images(spec.batch, spec.size))
    step = lambda: trainer.step(images)
    try:
      first = measure.timed(step)
    except Exception as error:  # noqa: BLE001  (torch.compile needs a working toolchain)
      if spec.framework != 'torch.compile':
        raise
      raise Skipped(f'torch.compile failed: {type(error).__name__}: {error}') from error
    counted = None
    if spec.framework == 'torch' and spec.dtype == 'float32':
      counted = measure.torch_flops(lambda: trainer.peer.loss(images[:1])[0].backward())
    return Contender(spec, step, sum(p.numel() for p in trainer.peer.trainable()), first,
                     torch_flops_per_image=counted)


def record(group: str, contender: Contender, timing: dict, flops: float | None) -> dict:
  spec = contender.spec
  s = measure.summary(timing['times'], timing['cpu_times'], spec.batch)
  out = {'group': group, 'name': spec.name, **dataclasses.asdict(spec),
         'trainable_params': contender.trainable_params, 'first_call_s': contender.first_call_s,
         'times': timing['times'], 'cpu_times': timing['cpu_times'], 'summary': s,
         'rss_mb': timing['rss_mb'],
         'peak_rss_mb': max(p for _, p in timing['rss_mb']),
         'step_rss_growth_mb': max(p - b for b, p in timing['rss_mb'])}
  if flops:
    out.update(flops_per_step=flops, flops_per_image=flops / spec.batch,
               flops_source='XLA cost analysis of kivfm\'s compiled step' +
               ('' if spec.framework == 'kivfm' else ' (same algorithm and shape)'),
               flops_per_s=flops / s['step_s'], flops_per_s_best=flops / s['step_s_min'])
  if contender.xla:
    out['xla_temp_mb'] = contender.xla['temp_bytes'] / 2 ** 20
  if contender.torch_flops_per_image:
    out['torch_counted_flops_per_image'] = contender.torch_flops_per_image
  return out


def run_group(bench: Bench, name: str, specs: list[Spec], deadline: float,
              memory: measure.Memory) -> list[dict]:
  """Builds the group's contenders, checks that compared ones train the same number of
  parameters, times them interleaved (rounds until `deadline`) and returns one record per
  spec."""
  bench.log(f'{name}:')
  ready, skipped = {}, {}
  for spec in specs:
    try:
      ready[spec] = bench.get(spec)
    except Skipped as note:
      bench.log(f'  note: {spec.label} skipped: {note}')
      skipped[spec] = str(note)
  if name.startswith('compare'):
    counts = {s.label: c.trainable_params for s, c in ready.items()}
    assert len(set(counts.values())) == 1, f'trainable parameters differ: {counts}'
  timings = measure.interleave({s.label: c.step for s, c in ready.items()}, bench.plan.rounds,
                               bench.plan.steps, memory, deadline, bench.log)
  kivfm_flops = next((c.xla['flops'] for c in ready.values() if c.xla), None)
  rows = []
  for spec in specs:
    if spec in skipped:
      rows.append({'group': name, 'name': spec.name, **dataclasses.asdict(spec),
                   'skipped': skipped[spec]})
    else:
      contender = ready[spec]
      flops = contender.xla['flops'] if contender.xla else (
          kivfm_flops if name.startswith('compare') else None)
      rows.append(record(name, contender, timings[spec.label], flops))
  return rows


def configure_compilation_cache() -> None:
  """JAX's persistent compilation cache (unless one is configured, a fresh folder removed at
  exit), so kivfm's step re-jitted for its XLA cost and initialisers shared by several runs
  compile once."""
  if not jax.config.jax_compilation_cache_dir:
    folder = tempfile.mkdtemp(prefix='kivfm-benchmark-xla-')
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    jax.config.update('jax_compilation_cache_dir', folder)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny shapes and rounds (the test)')
  parser.add_argument('--out', default='benchmarks/results', help='output directory')
  parser.add_argument('--groups', default='',
                      help='comma-separated group names to run (a prefix is enough: '
                           '"compare" runs both comparisons); default: all')
  args = parser.parse_args(argv)
  plan = QUICK if args.quick else FULL
  start = time.perf_counter()
  log = lambda text: print(f'[{time.perf_counter() - start:6.0f} s] {text}', flush=True)
  configure_compilation_cache()
  accelerator = jax.default_backend() != 'cpu'
  machine = measure.machine()
  log(f'{machine["cpu"]}, {machine["cores"]} cores, {machine["backend"]} '
      f'({machine["devices"]} devices), load average {machine["load_average"]}')
  dtype = 'bfloat16' if accelerator else 'float32'
  first_peak = measure.matmul_peak(dtype=dtype)
  log(f'dense matmul peak {first_peak["peak"] / 1e9:.0f} GFLOP/s')
  memory = measure.Memory()
  bench = Bench(plan, dtype, log)
  plan_groups = select(groups(plan, accelerator), args.groups)
  rows = []
  for i, (name, specs) in enumerate(plan_groups):   # each group gets its share of what is left
    now = time.perf_counter()
    deadline = now + (start + plan.budget_s - now) / (len(plan_groups) - i)
    rows += run_group(bench, name, specs, deadline, memory)
  # Other processes may slow a single measurement: the peak is the best of the first and last.
  peaks = measure.best_peak(first_peak, measure.matmul_peak(dtype=dtype))
  peaks['chip'] = measure.chip_peak(machine['device_kind']) if accelerator else None
  for row in rows:
    if 'flops_per_s' in row:
      row['utilization'] = row['flops_per_s'] / peaks['peak']
      row['utilization_best'] = row['flops_per_s_best'] / peaks['peak']
      if peaks['chip']:
        row['chip_utilization'] = row['flops_per_s'] / peaks['chip']
  results = {'machine': machine, 'matmul_peak': peaks, 'memory_method': memory.method,
             'plan': dataclasses.asdict(plan), 'wall_s': time.perf_counter() - start,
             'variants': rows}
  print(report.write(args.out, results))
  log(f'wrote {os.path.join(args.out, "step_benchmark.json")} and step_benchmark.png')
  return results


if __name__ == '__main__':
  allocator.restart_with_tcmalloc()
  main()
