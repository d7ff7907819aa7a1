"""Device mesh, logical-axis rules, multi-host set-up and host -> global arrays."""
from __future__ import annotations

import logging
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kivfm.errors import ConfigError
from kivfm.models import layers


def maybe_initialize_distributed(config) -> None:
  """Calls `jax.distributed.initialize` when `config.distributed.enabled` (once per process)."""
  d = config.distributed
  if not d.enabled or jax.distributed.is_initialized():
    return
  if d.cpu_collectives:  # used only by CPU devices; touching the backend here is not allowed
    jax.config.update('jax_cpu_collectives_implementation', d.cpu_collectives)
  kwargs = {}
  if d.coordinator_address:
    kwargs['coordinator_address'] = d.coordinator_address
  if d.num_processes > 0:
    kwargs['num_processes'] = d.num_processes
  if d.process_id >= 0:
    kwargs['process_id'] = d.process_id
  if d.local_device_ids:
    kwargs['local_device_ids'] = list(d.local_device_ids)
  jax.distributed.initialize(**kwargs)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the -1 entry of `config.mesh.shape` to the remaining devices."""
  shape, axes = tuple(mesh_config.shape), tuple(mesh_config.axes)
  if len(shape) != len(axes):
    raise ConfigError(f'config.mesh.shape={shape} has {len(shape)} entries but config.mesh.axes='
                      f'{axes} has {len(axes)}')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f'config.mesh.shape={shape}: use positive sizes and at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ConfigError(f'config.mesh.shape={shape} does not fit {num_devices} devices; '
                      f'the product of the sizes must divide {num_devices}')
  resolved = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(resolved) != num_devices:
    raise ConfigError(f'config.mesh.shape={shape} uses {math.prod(resolved)} devices but '
                      f'{num_devices} are present; set one entry to -1 or match the count')
  return resolved


def batch_parallelism(mesh_config, rules, num_devices: int) -> int:
  """Number of shards of the batch axis under the logical-axis `rules`."""
  shape = dict(zip(mesh_config.axes, mesh_shape(mesh_config, num_devices)))
  rules = dict(rules)
  return math.prod(shape[a] for a in _mesh_axes('batch', rules)) if 'batch' in rules else 1


def make_mesh(config, devices=None) -> Mesh:
  """The device mesh of `config.mesh` over `devices` (default: all), with the -1 entry
  resolved; axes are GSPMD-style (Auto)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config.mesh, len(devices))
  axes = tuple(config.mesh.axes)
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def _mesh_axes(logical: str | None, rules: dict) -> tuple[str, ...]:
  if logical is None:
    return ()
  if logical not in rules:
    raise KeyError(f'logical axis {logical!r} has no entry in config.sharding.rules '
                   f'(known: {", ".join(sorted(rules))})')
  axes = rules[logical]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def logical_to_spec(logical_axes, shape, rules, mesh: Mesh) -> P:
  """PartitionSpec for a tensor with logical axes. A dimension not divisible by its mesh axes,
  or a mesh axis already used by an earlier dimension, is replicated instead."""
  rules = dict(rules)
  used, spec = set(), []
  for name, size in zip(logical_axes, shape):
    axes = tuple(a for a in _mesh_axes(name, rules) if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def state_shardings(abstract_state: nnx.State, rules, mesh: Mesh) -> dict:
  """Pure-dict tree of NamedShardings for an (abstract) nnx.State, from its logical axes."""

  def one(variable):
    axes = layers.logical_axes(variable)
    if axes is None:
      if variable.ndim:
        raise ValueError(f'a {variable.shape} variable carries no logical axes; create every '
                         f'weight with kivfm.models.layers.param')
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(axes, variable.shape, rules, mesh))

  shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a [B, ...] batch: batch axis over the mesh axes of the 'batch' rule."""
  axes = tuple(a for a in _mesh_axes('batch', dict(rules)) if a in mesh.shape)
  return NamedSharding(mesh, P(axes or None, *([None] * (ndim - 1))))


def host_to_global(local_batch, mesh: Mesh, rules):
  """Assembles per-process numpy batches into global jax.Arrays sharded on the batch axis."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          batch_sharding(mesh, rules, np.ndim(x)), np.asarray(x)), local_batch)


# Programs that run once (parameter initialisation) compile several times faster this way.
RUN_ONCE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                             'xla_llvm_disable_expensive_passes': True}


def run_once(jitted, *args):
  """Compiles `jitted` for `args` with cheap compiler options and calls it."""
  try:
    compiled = jitted.lower(*args).compile(compiler_options=RUN_ONCE_COMPILER_OPTIONS)
  except Exception:  # a backend that does not know these options compiles normally
    compiled = jitted.lower(*args).compile()
  return compiled(*args)


def log_mesh(mesh: Mesh) -> None:
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), mesh.size,
               jax.process_count())
