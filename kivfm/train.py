"""Training: `train_and_evaluate(config, workdir)` builds the mesh, models and optimizer, then
runs the sharded, resumable distillation loop.

One step: frozen teachers (on-device preprocessing, stop_gradient) -> {x_t, V_t}; student +
unifier -> predictions; per-teacher losses; gradients for the trainable parameters only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from kivfm import checkpointing, config as config_lib, losses, metrics, sharding, teachers
from kivfm import stats as stats_lib
from kivfm.data import pipeline
from kivfm.models import normalizers
from kivfm.models.kpu import KPU
from kivfm.models.student import Student
from kivfm.models.unifier import Unifier
from kivfm.teachers import registry
from kivfm.weights import readers
from kivfm.weights.errors import check_keys_and_shapes

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite losses or gradients."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict                    # trainable parameters only (pure dict)
  stats: dict                     # teacher-feature normaliser statistics (EMA ones move)
  opt_state: Any
  nonfinite_run: jax.Array        # consecutive skipped updates
  nonfinite_total: jax.Array      # skipped updates in the whole run


def abstract_split(make, *filters):
  """(graphdef, *abstract states) of the module `make()` builds, without allocating it."""
  box = {}

  def states():
    graphdef, *parts = nnx.split(make(), *filters)
    box['graphdef'] = graphdef
    return parts

  parts = jax.eval_shape(states)
  return (box['graphdef'], *parts)


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


# --------------------------------------------------------------------------------------------
# Teachers: frozen, on the mesh, never checkpointed.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TeacherSet:
  graphdefs: dict                 # alias -> nnx.GraphDef
  params: dict                    # alias -> pure dict of jax.Arrays on the mesh
  shapes: dict                    # alias -> (width, (grid_h, grid_w))
  specs: dict                     # alias -> TeacherSpec

  def forward(self, params: dict, images: jax.Array) -> dict:
    """alias -> {'cls', 'patches'} (and native outputs) under stop_gradient."""
    out = {}
    for alias, graphdef in self.graphdefs.items():
      model = nnx.merge(graphdef, nnx.State(params[alias]))
      out[alias] = jax.lax.stop_gradient(model(images))
    return out


def _place(params: dict, abstract_state: nnx.State, shardings: dict, source: str) -> dict:
  """Host parameters -> global jax.Arrays with `shardings`, after checking every key and shape
  against the model (works across processes: each fills only its own shards)."""
  flat = readers.flatten(params)
  check_keys_and_shapes({path_str(p): v.shape for p, v in nnx.to_flat_state(abstract_state)},
                        flat, source)

  def one(path, s):
    x = np.asarray(flat[path_str(path)], np.float32)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree_util.tree_map_with_path(one, shardings)


def build_teachers(config, mesh) -> TeacherSet:
  graphdefs, params, shapes, specs = {}, {}, {}, {}
  probe = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, 3), jnp.uint8)
  for i, (alias, tcfg) in enumerate(sorted(config.teachers.items())):
    spec = registry.get(tcfg.name)
    make = lambda seed: teachers.Teacher(spec, image_size=tcfg.image_size,
                                         dtype=DTYPES[tcfg.dtype], rngs=nnx.Rngs(seed))
    graphdef, abstract_state = abstract_split(lambda: make(0))
    shardings = sharding.state_shardings(abstract_state, config.sharding.rules, mesh)
    if tcfg.weights == 'random':
      seed = config.seed + 1000 * (i + 1)
      init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make(seed))), out_shardings=shardings)
      params[alias] = sharding.run_once(init)
    else:
      params[alias] = _place(teachers.pretrained_params(spec, tcfg.weights), abstract_state,
                             shardings, f'teacher {alias} ({spec.name})')
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
                    lora_rank=s.lora_rank, lora_alpha=s.lora_alpha, remat=s.remat, dtype=dtype,
                    rngs=rngs)
  u = config.unifier
  unifier = Unifier(kb.arch.width, teacher_set.shapes, hidden=u.hidden, depth=u.layers,
                    shared_dim=u.shared_dim, normalizer=u.normalizer, momentum=u.ema_momentum,
                    dtype=dtype, rngs=rngs)
  return KPU(student, unifier)


def param_groups(config, abstract_state: nnx.State) -> dict:
  """path -> lr multiplier of every trainable parameter (first matching group wins)."""
  groups = [(re.compile(rx), float(mult)) for rx, mult in config.optim.groups]
  matched, used = {}, set()
  for path, variable in nnx.to_flat_state(abstract_state):
    if not isinstance(variable, nnx.Param):
      continue  # statistics and other state are never trained
    name = path_str(path)
    for rx, mult in groups:
      if rx.fullmatch(name):
        matched[name] = mult
        used.add(rx.pattern)
        break
  for rx, _ in groups:
    if rx.pattern not in used:
      raise config_lib.ConfigError(
          f'config.optim.groups: pattern {rx.pattern!r} matches no parameter '
          f'(parameters look like {path_str(nnx.to_flat_state(abstract_state)[0][0])!r})')
  return matched


# --------------------------------------------------------------------------------------------
# Optimizer: AdamW, warm-up + cosine, clipping, decay mask, per-group learning rates.
# --------------------------------------------------------------------------------------------

def make_schedule(config) -> optax.Schedule:
  o = config.optim
  warmup = min(o.warmup_steps, config.total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=o.lr * o.end_lr_fraction)


def make_optimizer(config, params: dict, multipliers: dict) -> optax.GradientTransformation:
  """`params`: pure dict of trainable parameters; `multipliers`: path -> lr multiplier."""
  o = config.optim
  no_decay = re.compile(o.no_decay)
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and not no_decay.fullmatch(path_str(path)), params)
  lr_scale = jax.tree_util.tree_map_with_path(
      lambda path, p: multipliers[path_str(path)], params)
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  parts.append(optax.adamw(make_schedule(config), b1=o.b1, b2=o.b2,
                           weight_decay=o.weight_decay, mask=decay_mask))
  if any(m != 1.0 for m in multipliers.values()):
    parts.append(optax.stateless(
        lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, lr_scale)))
  return optax.chain(*parts)


def opt_state_shardings(tx, abstract_params: dict, param_shardings: dict, mesh):
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated)


# --------------------------------------------------------------------------------------------
# The jitted train step.
# --------------------------------------------------------------------------------------------

def make_train_step(config, kpu_graphdef, teacher_set: TeacherSet, tx):
  weights = {alias: t.weight for alias, t in config.teachers.items()}
  schedule = make_schedule(config)

  def train_step(state: TrainState, frozen: dict, teacher_params: dict, images: jax.Array):
    targets = teacher_set.forward(teacher_params, images)
    merge = lambda params, stats: nnx.merge(kpu_graphdef, nnx.State(params), nnx.State(stats),
                                           nnx.State(frozen))
    model = merge(state.params, state.stats)
    model.unifier.update_stats(targets)
    stats = nnx.to_pure_dict(nnx.state(model, normalizers.NormStats))

    def loss_fn(params):
      return losses.objective(merge(params, stats), images, targets, weights,
                              config.student.knowledge_base, config.loss)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient skips the update: keep the old parameters and moments.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    run = jnp.where(finite, 0, state.nonfinite_run + 1)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           stats=keep(stats, state.stats),
                           opt_state=keep(opt_state, state.opt_state), nonfinite_run=run,
                           nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    scalars = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'nonfinite_total': new_state.nonfinite_total, 'nonfinite_run': run, **terms}
    return new_state, scalars

  return train_step


def make_grad_shares(config, kpu_graphdef, teacher_set: TeacherSet):
  """Each teacher's gradient norm and share of the sum, so imbalance is visible (log steps)."""
  weights = {alias: t.weight for alias, t in config.teachers.items()}

  def grad_shares(state: TrainState, frozen: dict, teacher_params: dict, images: jax.Array):
    targets = teacher_set.forward(teacher_params, images)

    def teacher_loss(params, alias):
      model = nnx.merge(kpu_graphdef, nnx.State(params), nnx.State(state.stats),
                        nnx.State(frozen))
      _, terms = losses.objective(model, images, targets, weights,
                                  config.student.knowledge_base, config.loss)
      return weights[alias] * terms[f'loss/{alias}']

    norms = {alias: optax.global_norm(jax.grad(teacher_loss)(state.params, alias))
             for alias in sorted(targets)}
    total = sum(norms.values()) + 1e-12
    return {**{f'grad_norm/{a}': n for a, n in norms.items()},
            **{f'grad_share/{a}': n / total for a, n in norms.items()}}

  return grad_shares


# --------------------------------------------------------------------------------------------
# Assembly of the whole run state.
# --------------------------------------------------------------------------------------------

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
  step_fn: Any                    # jitted train step
  grad_shares_fn: Any             # jitted per-teacher gradient norms (log steps)


def load_fixed_stats(config, teacher_set: TeacherSet, stats: dict, stats_dir: str) -> dict:
  """Statistics of the 'zscore' / 'phi_s' normalisers from `kivfm.compute_stats` files, as
  host values in the layout of TrainState.stats."""
  from kivfm.stats import FeatureStats, stats_path
  stats = jax.device_get(stats)
  for alias in teacher_set.specs:
    width = teacher_set.shapes[alias][0]
    for kind in ('cls', 'patches'):
      path = stats_path(stats_dir, alias, kind)
      if not os.path.exists(path):
        raise config_lib.ConfigError(
            f'config.unifier.normalizer={config.unifier.normalizer!r} needs teacher statistics; '
            f'{path} is missing. Compute them first: python -m kivfm.compute_stats '
            f'--config=<this config> --workdir=<this workdir>')
      module = normalizers.make(config.unifier.normalizer, width, stats=FeatureStats.load(path))
      stats['unifier']['norm'][alias][kind] = nnx.to_pure_dict(
          nnx.state(module, normalizers.NormStats))
  return stats


def build_run(config, mesh, stats_dir: str = '') -> Run:
  """Everything a run needs on `mesh`; `stats_dir` holds fixed normaliser statistics."""
  teacher_set = build_teachers(config, mesh)
  rules = config.sharding.rules
  make = lambda: build_kpu(config, teacher_set, config.seed)
  _, abstract_full = abstract_split(make)
  multipliers = param_groups(config, abstract_full)
  is_trainable = lambda path, _: path_str(path) in multipliers
  kpu_graphdef, abstract_train, abstract_stats, abstract_frozen = abstract_split(
      make, is_trainable, normalizers.NormStats, ...)
  train_shardings = sharding.state_shardings(abstract_train, rules, mesh)
  stats_shardings = sharding.state_shardings(abstract_stats, rules, mesh)
  frozen_shardings = sharding.state_shardings(abstract_frozen, rules, mesh)
  abstract_params = nnx.to_pure_dict(abstract_train)
  tx = make_optimizer(config, abstract_params, multipliers)
  replicated = NamedSharding(mesh, P())
  state_shardings = TrainState(
      step=replicated, params=train_shardings, stats=stats_shardings,
      opt_state=opt_state_shardings(tx, abstract_params, train_shardings, mesh),
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

  init = jax.jit(init, out_shardings=(state_shardings, frozen_shardings))
  state, frozen = sharding.run_once(init, kb_params)
  if config.unifier.normalizer in ('zscore', 'phi_s'):
    fixed = load_fixed_stats(config, teacher_set, state.stats, stats_dir)
    state = state.replace(stats=jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
        fixed, state_shardings.stats))

  teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_set.params)
  images_sharding = sharding.batch_sharding(mesh, rules, 4)
  step_fn = jax.jit(
      make_train_step(config, kpu_graphdef, teacher_set, tx),
      in_shardings=(state_shardings, frozen_shardings, teacher_shardings, images_sharding),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  grad_shares_fn = jax.jit(
      make_grad_shares(config, kpu_graphdef, teacher_set),
      in_shardings=(state_shardings, frozen_shardings, teacher_shardings, images_sharding),
      out_shardings=replicated)
  return Run(mesh, teacher_set, kpu_graphdef, frozen, state, state_shardings, frozen_shardings,
             tx, step_fn, grad_shares_fn)


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------

class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so a final checkpoint gets written."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning('SIGTERM: writing a checkpoint at the end of this step, then exiting')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):
  """Raised after the preemption checkpoint is written; main exits with 128 + SIGTERM."""


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains to `config.total_steps` (resuming from DIR/checkpoints) and returns final metrics."""
  sharding.maybe_initialize_distributed(config)
  config_lib.validate(config, jax.device_count(), jax.process_count())
  lead = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  config_dict = json.loads(config.to_json())
  if lead:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config_dict, f, indent=2)

  mesh = sharding.make_mesh(config)
  sharding.log_mesh(mesh)
  with jax.set_mesh(mesh):
    run = build_run(config, mesh, stats_lib.stats_dir(config, workdir))
    data_iter = pipeline.make_iterator(config, jax.process_index(), jax.process_count())
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                      every=config.checkpoint_every)
    state = run.state
    start = ckpt.latest_step()
    if start is not None:
      state = ckpt.restore(start, abstract_like(state, run.state_shardings), data_iter)
      logging.info('resumed from step %d', start)
    start = int(state.step)

    if config.eval.enabled:  # the untrained student's fidelity is measured up front
      from kivfm.evals import report
      evaluation = report.Evaluation(config, run)
    writer = metrics.MetricsWriter(workdir, enabled=lead, start_step=start)
    progress = metrics.Progress(config.total_steps, start, config.progress if lead else 'none')
    teacher_params = run.teacher_set.params
    last = {}
    try:
      with _Preemption() as preemption:
        step, t_prev = start, time.time()
        while step < config.total_steps:
          local = next(data_iter)
          batch = sharding.host_to_global({'image': local['image']}, mesh,
                                          config.sharding.rules)
          log_step = (step + 1) % config.log_every == 0
          every = config.grad_share_every
          shares = (run.grad_shares_fn(state, run.frozen, teacher_params, batch['image'])
                    if every and (step + 1) % every == 0 else {})
          state, scalars = run.step_fn(state, run.frozen, teacher_params, batch['image'])
          step += 1
          scalars = {**jax.device_get(scalars), **jax.device_get(shares),
                     'data/skipped': local.get('skipped', 0)}   # bad records, this process
          now = time.time()
          scalars['step_time'] = now - t_prev
          scalars['images_per_s'] = config.data.batch_size / max(now - t_prev, 1e-9)
          t_prev = now
          writer.write(step, scalars)
          last = scalars
          progress.update(step, f'loss {scalars["loss"]:.4f}', log_step)
          if scalars['nonfinite_run'] >= config.max_consecutive_nonfinite:
            raise NonFiniteError(
                f'{int(scalars["nonfinite_run"])} consecutive non-finite losses or gradients '
                f'at step {step} (config.max_consecutive_nonfinite='
                f'{config.max_consecutive_nonfinite}); the last good checkpoint in '
                f'{ckpt.directory} is intact. Lower config.optim.lr or check the data.')
          if scalars['nonfinite_run'] == 0:
            ckpt.save(step, state, data_iter, config_dict)
          if preemption.requested or ckpt.reached_preemption(step):
            ckpt.save(step, state, data_iter, config_dict, force=True)
            ckpt.wait()
            raise Preempted(f'preempted at step {step}; checkpoint written to {ckpt.directory}')
        if ckpt.latest_step() != step and int(state.nonfinite_run) == 0:
          ckpt.save(step, state, data_iter, config_dict, force=True)
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
  if config.eval.enabled:
    with jax.set_mesh(mesh):
      evaluation.finish(workdir, state, write=lead)
  if jax.process_count() > 1:  # leave together, so no process waits alone at shutdown
    multihost_utils.sync_global_devices('kivfm:train_and_evaluate:end')
  return {k: float(v) for k, v in last.items()}
