"""Everything a run is made of, on a mesh: the frozen teachers, the KPU (student + unifier) split
into trainable / statistics / frozen parts, the optimizer and the train state with its
shardings. Used by training, inference and `compute_stats`; knows nothing of the loop.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kivfm import optim, sharding, teachers
from kivfm.errors import ConfigError
from kivfm.models import adapters, normalizers, vit
from kivfm.models.kpu import KPU
from kivfm.models.student import Student
from kivfm.models.unifier import Unifier
from kivfm.stats import FeatureStats, stats_path
from kivfm.teachers import registry
from kivfm.weights.readers import path_str

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def abstract_split(make, *filters):
  """(graphdef, *abstract states) of the module `make()` builds, without allocating it."""
  box = {}

  def states():
    graphdef, *parts = nnx.split(make(), *filters)
    box['graphdef'] = graphdef
    return parts

  parts = jax.eval_shape(states)
  return (box['graphdef'], *parts)


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# --------------------------------------------------------------------------------------------
# Teachers: frozen, on the mesh, never checkpointed.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TeacherSet:
  graphdefs: dict                 # alias -> nnx.GraphDef
  params: dict                    # alias -> pure dict of jax.Arrays on the mesh
  shapes: dict                    # alias -> (width, (grid_h, grid_w))
  specs: dict                     # alias -> TeacherSpec

  def forward(self, params: dict, images: jax.Array, trunk: tuple | None = None) -> dict:
    """alias -> {'cls', 'patches'} (and native outputs) under stop_gradient. `trunk`:
    (alias, tokens, grid, start): that teacher continues from the tokens entering its block
    `start` instead of running on `images` (a trunk shared with the student)."""
    out = {}
    for alias, graphdef in self.graphdefs.items():
      model = nnx.merge(graphdef, nnx.State(params[alias]))
      if trunk is not None and trunk[0] == alias:
        out[alias] = jax.lax.stop_gradient(model.from_tokens(*trunk[1:]))
      else:
        out[alias] = jax.lax.stop_gradient(model(images))
    return out


def kernels_in_compute_dtype(config, teacher_set: TeacherSet) -> TeacherSet:
  """The teachers with their Dense / Conv kernels stored in their compute dtype: those layers
  cast kernels at use, so outputs are unchanged while memory and per-step casts drop (bf16)."""
  def to(x, dtype):   # an abstract leaf keeps its sharding
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)

  def cast(alias, params):
    dtype = DTYPES[config.teachers[alias].dtype]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: to(x, dtype) if path_str(path).endswith('kernel') else x, params)
  return dataclasses.replace(teacher_set, params={alias: cast(alias, p) for alias, p in
                                                  teacher_set.params.items()})


def check_upsampling(config, alias: str, spec) -> None:
  """A teacher may enlarge the view at most `config.data.max_teacher_upsample` times."""
  limit, view = config.data.max_teacher_upsample, config.data.image_size
  size = config.teachers[alias].image_size or max(spec.image_size)
  if limit and size > limit * view:
    raise ConfigError(
        f'teacher {alias} ({spec.name}) would see the {view} px view enlarged to {size} px, '
        f'{size / view:.2g}x (config.data.max_teacher_upsample={limit:g}): the extra compute looks '
        f'at a blurred image. Set config.teachers.{alias}.image_size <= {int(limit * view)} '
        f'(multiples of its patch size), raise config.data.image_size to >= '
        f'{math.ceil(size / limit)}, or set config.data.max_teacher_upsample=0 to allow it.')


def build_teachers(config, mesh, abstract: bool = False) -> TeacherSet:
  """The frozen teachers on `mesh`; `abstract`: their parameters as ShapeDtypeStructs carrying
  their shardings, nothing allocated and no weight file read."""
  graphdefs, params, shapes, specs = {}, {}, {}, {}
  probe = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, 3), jnp.uint8)
  for i, (alias, tcfg) in enumerate(sorted(config.teachers.items())):
    spec = registry.get(tcfg.name)   # + how its attention is computed (config.attention)
    check_upsampling(config, alias, spec)
    spec = dataclasses.replace(spec, arch=vit.with_attention(spec.arch, **config.attention))
    make = lambda seed: teachers.Teacher(spec, image_size=tcfg.image_size,
                                         dtype=DTYPES[tcfg.dtype], rngs=nnx.Rngs(seed))
    graphdef, abstract_state = abstract_split(lambda: make(0))
    shardings = sharding.state_shardings(abstract_state, config.sharding.rules, mesh)
    if abstract:
      params[alias] = abstract_like(nnx.to_pure_dict(abstract_state), shardings)
    elif tcfg.weights == 'random':
      seed = config.seed + 1000 * (i + 1)
      init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make(seed))), out_shardings=shardings)
      params[alias] = sharding.run_once(init)
    else:
      params[alias] = teachers.place(teachers.pretrained_params(spec, tcfg.weights),
                                     abstract_state, f'teacher {alias} ({spec.name})', shardings)
    out = jax.eval_shape(lambda p, x: nnx.merge(graphdef, nnx.State(p))(x), params[alias], probe)
    shapes[alias] = (out['cls'].shape[-1], tuple(out['patches'].shape[1:3]))
    graphdefs[alias], specs[alias] = graphdef, spec
  return TeacherSet(graphdefs, params, shapes, specs)


# --------------------------------------------------------------------------------------------
# Student + unifier: trainable by optimizer groups, the rest frozen.
# --------------------------------------------------------------------------------------------

def build_kpu(config, teacher_set: TeacherSet, seed: int) -> KPU:
  kb = teacher_set.specs[config.student.knowledge_base]
  s = config.student
  dtype = DTYPES[config.dtype]
  rngs = nnx.Rngs(seed)
  student = Student(kb.arch, image_size=(config.data.image_size,) * 2, mean=kb.mean, std=kb.std,
                    adapter=s.adapter, adapter_dim=s.adapter_dim, adapter_scale=s.adapter_scale,
                    lora_rank=s.lora_rank, lora_alpha=s.lora_alpha,
                    adapter_blocks=s.adapter_blocks, remat=s.remat, dtype=dtype, rngs=rngs)
  u = config.unifier
  unifier = Unifier(kb.arch.width, teacher_set.shapes, hidden=u.hidden, depth=u.layers,
                    shared_dim=u.shared_dim, normalizer=u.normalizer, momentum=u.ema_momentum,
                    dtype=dtype, rngs=rngs)
  return KPU(student, unifier)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict                    # trainable parameters only (pure dict)
  stats: dict                     # teacher-feature normaliser statistics (EMA ones move)
  opt_state: Any
  nonfinite_run: jax.Array        # consecutive skipped updates
  nonfinite_total: jax.Array      # skipped updates in the whole run


@dataclasses.dataclass
class Run:
  mesh: Any
  teacher_set: TeacherSet
  kpu_graphdef: Any
  frozen: dict                    # frozen student parameters (pure dict, on the mesh)
  state: TrainState
  state_shardings: TrainState
  frozen_shardings: dict
  tx: optax.GradientTransformation

  def kpu(self, state: TrainState | None = None) -> KPU:
    """The KPU module holding `state` (default: the initial state)."""
    state = self.state if state is None else state
    return nnx.merge(self.kpu_graphdef, nnx.State(state.params), nnx.State(state.stats),
                     nnx.State(self.frozen))


def shares_trunk(config, run: Run) -> bool:
  """Whether the student's lower blocks, below its first adapter (`student.adapter_blocks`),
  compute exactly what the knowledge-base teacher computes, so one evaluation serves both:
  nothing there trains, and both see the same view at the same resolution and dtype."""
  alias = config.student.knowledge_base
  tcfg, spec = config.teachers[alias], run.teacher_set.specs[alias]
  if not config.student.adapter_blocks or tcfg.dtype != config.dtype:
    return False
  size = tcfg.image_size or spec.image_size
  if tuple(size if isinstance(size, tuple) else (size, size)) != (config.data.image_size,) * 2:
    return False
  first = adapters.first_adapted(spec.arch.depth, config.student.adapter_blocks)
  trunk = ('patch_embed', 'cls_token', 'registers', 'pos_embed', 'pre_norm',
           *(f'blocks/{i}' for i in range(first)))
  trainable = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.state.params)[0]]
  return not any(p == f'student/vit/{t}' or p.startswith(f'student/vit/{t}/')
                 for p in trainable for t in trunk)


def load_fixed_stats(config, teacher_set: TeacherSet, stats: dict, stats_dir: str) -> dict:
  """Statistics of the 'zscore' / 'phi_s' normalisers from `kivfm.compute_stats` files, as
  host values in the layout of TrainState.stats."""
  stats = jax.device_get(stats)
  for alias in teacher_set.specs:
    width = teacher_set.shapes[alias][0]
    for kind in ('cls', 'patches'):
      path = stats_path(stats_dir, alias, kind)
      if not path.exists():
        raise ConfigError(
            f'config.unifier.normalizer={config.unifier.normalizer!r} needs teacher statistics; '
            f'{path} is missing. Compute them first: python -m kivfm.compute_stats '
            f'--config=<this config> --workdir=<this workdir>')
      module = normalizers.make(config.unifier.normalizer, width, stats=FeatureStats.load(path))
      stats['unifier']['norm'][alias][kind] = nnx.to_pure_dict(
          nnx.state(module, normalizers.NormStats))
  return stats


def build_run(config, mesh, stats_dir: str = '', abstract: bool = False) -> Run:
  """Everything a run needs on `mesh`; `stats_dir` holds fixed normaliser statistics.
  `abstract`: every array a ShapeDtypeStruct with its sharding (for ahead-of-time compiles):
  nothing allocated, no weight or statistics file read."""
  teacher_set = build_teachers(config, mesh, abstract)
  rules = config.sharding.rules
  make = lambda: build_kpu(config, teacher_set, config.seed)
  _, abstract_full = abstract_split(make)
  multipliers = optim.param_groups(config, abstract_full)
  is_trainable = lambda path, _: path_str(path) in multipliers
  kpu_graphdef, abstract_train, abstract_stats, abstract_frozen = abstract_split(
      make, is_trainable, normalizers.NormStats, ...)
  train_shardings = sharding.state_shardings(abstract_train, rules, mesh)
  stats_shardings = sharding.state_shardings(abstract_stats, rules, mesh)
  frozen_shardings = sharding.state_shardings(abstract_frozen, rules, mesh)
  abstract_params = nnx.to_pure_dict(abstract_train)
  tx = optim.make_optimizer(config, abstract_params, multipliers)
  replicated = NamedSharding(mesh, P())
  state_shardings = TrainState(
      step=replicated, params=train_shardings, stats=stats_shardings,
      opt_state=optim.opt_state_shardings(tx, abstract_params, train_shardings, mesh),
      nonfinite_run=replicated, nonfinite_total=replicated)

  kb_params = teacher_set.params[config.student.knowledge_base]

  def init(kb_params):
    model = make()
    # The student's ViT inherits the knowledge-base teacher's weights.
    nnx.update(model.student.vit, nnx.State(kb_params['model']))
    _, trainable, stats, frozen = nnx.split(model, is_trainable, normalizers.NormStats, ...)
    params = nnx.to_pure_dict(trainable)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, stats=nnx.to_pure_dict(stats),
                       opt_state=tx.init(params), nonfinite_run=zero, nonfinite_total=zero)
    return state, nnx.to_pure_dict(frozen)

  out_shardings = (state_shardings, frozen_shardings)
  init = jax.jit(init, out_shardings=out_shardings)
  if abstract:
    state, frozen = abstract_like(jax.eval_shape(init, kb_params), out_shardings)
  else:
    state, frozen = sharding.run_once(init, kb_params)
  teacher_set = kernels_in_compute_dtype(config, teacher_set)  # after the student inherits
  if config.unifier.normalizer in ('zscore', 'phi_s') and not abstract:  # same shapes
    fixed = load_fixed_stats(config, teacher_set, state.stats, stats_dir)
    state = state.replace(stats=jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
        fixed, state_shardings.stats))
  return Run(mesh, teacher_set, kpu_graphdef, frozen, state, state_shardings, frozen_shardings,
             tx)
