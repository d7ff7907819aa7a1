"""Ahead-of-time check: does the full-size train step fit a chip, and how long would the run take?

  python -m kivfm.aot --config=configs/base.py --topology=v5p-64 [--batch_per_device=N]
      [--mfu=0.4] [--out=FILE.json]

Compiles the real train step (`train.jit_train_step`; teachers online, or with
`--config.teacher_cache=DIR` the cached targets in their place) for the topology's device
count on this machine's CPU, as fake host devices, over an abstract run (`assembly.build_run(...,
abstract=True)`: nothing allocated, no weights read), then reports per device: XLA's memory plan
(arguments + outputs + temporaries - aliased, the donated state) against the chip's HBM, the
FLOPs per image and the hours of `config.total_steps` steps at a model-FLOPs utilisation.

Estimates, not measurements: XLA:CPU plans the buffers of the step traced as the accelerator's
program (`backend.as_accelerator`: none of XLA:CPU's own paths), with its fusions and layouts,
not the TPU / GPU compiler's (GPU runs use cuDNN attention, which CPU cannot), and JAX on GPU
preallocates 75% of HBM by default. FLOPs are XLA's count of the step with plain attention (XLA counts a loop
body once, and blocked attention is a loop; same arithmetic, apart from the blocked backward's
recomputation); it includes remat's recomputation and the per-teacher gradient-norm branch
(XLA counts the larger branch of a cond), so hours are an upper figure for that MFU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from kivfm import assembly, backend, paths, sharding, train
from kivfm import config as config_lib
from kivfm.data import cached
from kivfm.errors import ConfigError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Topology:
  devices: int          # chips as JAX sees them (one per TPU v4 / v5p megacore chip)
  hbm_gib: float        # HBM per device
  peak_tflops: float    # dense bf16 peak per device


TOPOLOGIES = {
    'v4-32': Topology(16, 32, 275),
    'v5p-64': Topology(32, 95, 459),
    'v5e-16': Topology(16, 16, 197),
    'v6e-8': Topology(8, 32, 918),
    '8xH100': Topology(8, 80, 989),     # SXM
    '8xA100': Topology(8, 80, 312),
}


def topology(name: str) -> Topology:
  if name not in TOPOLOGIES:
    raise ConfigError(f'unknown topology {name!r}; known: {", ".join(TOPOLOGIES)}')
  return TOPOLOGIES[name]


def lower_step(config, mesh, abstract_images):
  """The jitted train step of `config` lowered for an abstract run on `mesh`: teachers online,
  or with `config.teacher_cache` set their stored targets (float32, as the cache reader gives
  them) in their place."""
  run = assembly.build_run(config, mesh, abstract=True)
  from_cache = bool(config.teacher_cache)
  teachers = run.teacher_set.params
  if from_cache:
    batch = abstract_images.shape[0]
    sharded = lambda shape: jax.ShapeDtypeStruct(
        shape, jnp.float32, sharding=sharding.batch_sharding(mesh, config.sharding.rules,
                                                             len(shape)))
    teachers = {alias: {'cls': sharded((batch, width)), 'patches': sharded((batch, *grid, width))}
                for alias, (width, grid) in run.teacher_set.shapes.items()}
    if config.cache.student_trunk:   # the student starts from the stored trunk tokens
      kb = run.teacher_set.specs[config.student.knowledge_base]
      abstract_images = sharded((batch, *cached.trunk_shape(config, kb.arch)))
  return train.jit_train_step(config, run, cached=from_cache).lower(
      run.state, run.frozen, teachers, abstract_images, False)


def analyze(config, name: str, batch_per_device: int | None = None, mfu: float = 0.4) -> dict:
  """Compiles the train step of `config` for topology `name` on this process's devices (as
  many as the topology has) and returns memory per device, FLOPs per image, verdict and hours."""
  chip = topology(name)
  devices = jax.device_count()
  if devices != chip.devices:
    raise ConfigError(f'topology {name} has {chip.devices} devices but this process sees '
                      f'{devices}; run python -m kivfm.aot, which sets XLA_FLAGS='
                      f'--xla_force_host_platform_device_count={chip.devices}')
  if batch_per_device is None:
    if config.data.batch_size % devices:
      raise ConfigError(f'config.data.batch_size={config.data.batch_size} does not divide over '
                        f'the {devices} devices of {name}; pass --batch_per_device')
    batch_per_device = config.data.batch_size // devices
  if batch_per_device < 1:
    raise ConfigError(f'batch per device {batch_per_device} on {name} must be >= 1')
  config = config.copy_and_resolve_references()
  config.data.batch_size = global_batch = batch_per_device * devices
  config_lib.validate(config, devices)

  mesh = sharding.make_mesh(config)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8,
                                sharding=sharding.batch_sharding(mesh, config.sharding.rules, 4))
  # Traced as the accelerator's program: without XLA:CPU's own paths (e.g. its attention kernel,
  # which plans no [N, N] logits where a TPU's plain attention does).
  with jax.set_mesh(mesh), backend.as_accelerator():
    start = time.perf_counter()
    lowered = lower_step(config, mesh, images)
    # On CPU, less LLVM effort: the same buffers and FLOPs, compiled several times faster.
    cpu = jax.default_backend() == 'cpu'
    compiled = lowered.compile(compiler_options=sharding.RUN_ONCE_COMPILER_OPTIONS if cpu else None)
    compile_s = time.perf_counter() - start
    plain = config.copy_and_resolve_references()
    plain.attention.impl = 'plain'
    flops = lower_step(plain, mesh, images).cost_analysis()['flops']   # global: not partitioned

  m = compiled.memory_analysis()
  memory = {'arguments': m.argument_size_in_bytes, 'outputs': m.output_size_in_bytes,
            'temporaries': m.temp_size_in_bytes, 'aliased': m.alias_size_in_bytes}
  memory['total'] = memory['arguments'] + memory['outputs'] + memory['temporaries'] - memory[
      'aliased']
  headroom = chip.hbm_gib - memory['total'] / GIB
  flops_per_image = flops / global_batch
  hours = (config.total_steps * global_batch * flops_per_image /
           (devices * chip.peak_tflops * 1e12 * mfu) / 3600)
  return {'topology': name, **dataclasses.asdict(chip), 'batch_per_device': batch_per_device,
          'global_batch': global_batch, 'image_size': size, 'memory_bytes': memory,
          'fits': headroom >= 0, 'verdict': 'fits' if headroom >= 0 else 'does not fit',
          'headroom_gib': headroom, 'flops_per_image': flops_per_image,
          # XLA's count of the compiled program: per device (SPMD), loop bodies once
          'compiled_flops_per_image': compiled.cost_analysis()['flops'] * devices / global_batch,
          'total_steps': config.total_steps, 'mfu': mfu, 'hours': hours,
          'compile_s': compile_s}


def report(r: dict) -> str:
  mem = {k: f'{v / GIB:.2f} GiB' if v >= GIB else f'{v / 2**20:.1f} MiB'
         for k, v in r['memory_bytes'].items()}
  return '\n'.join([
      f'{r["topology"]}: {r["devices"]} devices, {r["hbm_gib"]:g} GiB HBM and '
      f'{r["peak_tflops"]:g} TFLOP/s (bf16) each; global batch {r["global_batch"]} '
      f'({r["batch_per_device"]} per device) at {r["image_size"]} px; compiled in '
      f'{r["compile_s"]:.0f} s',
      'memory per device: ' + ', '.join(f'{k} {v}' for k, v in mem.items()),
      f'verdict: {r["verdict"]} ({r["headroom_gib"]:+.2f} GiB headroom of {r["hbm_gib"]:g} GiB)',
      f'FLOPs per image: {r["flops_per_image"] / 1e9:.4g} GFLOP',
      f'{r["total_steps"]} steps at MFU {r["mfu"]:g}: {r["hours"]:.3g} h'])


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------

def _define_flags() -> None:
  """The command's flags, defined only when it runs (kivfm.main defines --config too)."""
  config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)); path[:arg], '
                                  'e.g. configs/base.py.', lock_config=True)
  flags.DEFINE_string('topology', None, f'One of: {", ".join(TOPOLOGIES)}.')
  flags.DEFINE_integer('batch_per_device', None,
                       'Images per device (default: config.data.batch_size / devices).')
  flags.DEFINE_float('mfu', 0.4, 'Model-FLOPs utilisation assumed for the hours.')
  flags.DEFINE_string('out', '', 'Also write the result as JSON to this file.')
  flags.mark_flags_as_required(['config', 'topology'])


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    chip = topology(f.topology)
    # Before JAX's backend starts: fake CPU devices, as many as the topology has.
    kept = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
            if not flag.startswith('--xla_force_host_platform_device_count')]
    os.environ['XLA_FLAGS'] = ' '.join(
        kept + [f'--xla_force_host_platform_device_count={chip.devices}'])
    os.environ['JAX_PLATFORMS'] = 'cpu'
    jax.config.update('jax_platforms', 'cpu')   # jax read the variable at import
    result = analyze(f.config, f.topology, f.batch_per_device, f.mfu)
  except ConfigError as e:
    sys.exit(f'config error: {e}')
  print(report(result))
  if f.out:
    paths.write_text_atomic(paths.path(f.out), json.dumps(result, indent=2))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
