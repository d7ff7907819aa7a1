"""Training: `train_and_evaluate(config, workdir)` assembles the run on the mesh
(`kivfm.assembly`), then runs the sharded, resumable distillation loop. A leaf: only the entry
points `kivfm.main` and `kivfm.aot` import it.

One step: frozen teachers (on-device preprocessing, stop_gradient) -> {x_t, V_t}; KPU (student +
unifier) -> its outputs; the objective of outputs and targets; gradients for the trainable
parameters only.
"""
from __future__ import annotations

import json
import logging
import signal
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from kivfm import (assembly, checkpointing, config as config_lib, evals, inference, losses,
                   metrics, optim, paths, sharding)
from kivfm import stats as stats_lib
from kivfm import teachers as teachers_lib
from kivfm.data import cached, pipeline
from kivfm.models import normalizers


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite losses or gradients."""


# --------------------------------------------------------------------------------------------
# The jitted train step.
# --------------------------------------------------------------------------------------------

def make_train_step(config, run: assembly.Run, cached: bool = False):
  """train_step(state, frozen, teachers, images, with_shares=False) -> (state, scalars).

  `teachers`: the teachers' parameters (they run once, on this batch), or with `cached` their
  targets on it, alias -> {'cls', 'patches'} (read from a teacher-target cache, `kivfm.cache`).
  `images`: uint8 views, or with `cached` and config.cache.student_trunk the student's trunk
  tokens on them [B, T, D] (from the cache; the student starts at its first adapted block).
  The KPU runs forward once. With `with_shares` (a boolean, traced: one
  program for all steps) the same forward pass also gives the norm of the gradient each teacher's
  weighted loss sends into the student's features f(I) = {x, V} and its share of their sum
  (`grad_norm/<t>`, `grad_share/<t>`; one batched backward pass through the unifier, with this
  step's statistics); without it those scalars are zero.
  """
  weights = {alias: t.weight for alias, t in config.teachers.items()}
  aliases = sorted(config.teachers)
  schedule = optim.make_schedule(config)
  teacher_set, graphdef, tx = run.teacher_set, run.kpu_graphdef, run.tx
  share_trunk = assembly.shares_trunk(config, run)
  trunk_inputs = cached and config.cache.student_trunk
  if trunk_inputs and not share_trunk:
    raise config_lib.ConfigError(
        'config.cache.student_trunk=True, but this student trains parameters below its first '
        'adapted block (config.student.adapter_blocks), so the cached trunk does not serve it')

  distilled = config.loss.head_outputs

  def native_heads(alias, params, features):  # the distilled heads of teacher `alias`
    teacher = nnx.merge(teacher_set.graphdefs[alias], nnx.State(params))
    parts = {k: v for k, v in teacher.head_parts().items() if k in distilled}
    return teachers_lib.apply_heads(parts, features, teacher.image_size,
                                    teacher.pooled_embedding and 'embedding' in distilled)

  def train_step(state: assembly.TrainState, frozen: dict, teachers: dict,
                 images: jax.Array, with_shares=False):
    merge = lambda params, stats: nnx.merge(graphdef, nnx.State(params), nnx.State(stats),
                                           nnx.State(frozen))
    model = merge(state.params, state.stats)
    if trunk_inputs:  # the cache holds the frozen blocks' output on the views
      student = lambda p: merge(p, state.stats).student.from_trunk(
          images.astype(model.student.dtype), model.student.grid)
      trunk = None
    elif share_trunk:  # the frozen blocks below the first adapter run once, for both
      tokens, grid = model.student.trunk(images)
      student = lambda p: merge(p, state.stats).student.from_trunk(tokens, grid)
      trunk = (config.student.knowledge_base, tokens, grid, model.student.first_adapted)
    else:
      student, trunk = lambda p: merge(p, state.stats).student(images), None
    targets = teachers if cached else teacher_set.forward(teachers, images, trunk)
    model.unifier.update_stats(targets)
    stats = nnx.to_pure_dict(nnx.state(model, normalizers.NormStats))

    # Two stages, so each teacher's gradient at the student's features comes from this forward
    # pass: f(I) = student(params); loss = objective(unify(params, f(I))).
    features, student_backward = jax.vjp(student, state.params)

    def heads_loss(params, features):
      outputs = merge(params, stats).unify(features, targets)
      if config.loss.head_weight:  # what each teacher's own heads make of its prediction
        outputs['heads'] = {a: native_heads(a, teachers[a], outputs['in_teacher_space'][a])
                            for a in aliases}
      loss, terms = losses.objective(outputs, targets, weights, config.student.knowledge_base,
                                     config.loss)
      per_teacher = jnp.stack([weights[a] * terms[f'loss/{a}'] for a in aliases])
      return (loss, per_teacher), terms

    (loss, per_teacher), heads_backward, terms = jax.vjp(heads_loss, state.params, features,
                                                         has_aux=True)
    head_grads, feature_grads = heads_backward((jnp.ones_like(loss), jnp.zeros_like(per_teacher)))
    (student_grads,) = student_backward(feature_grads)
    grads = jax.tree.map(jnp.add, head_grads, student_grads)

    def teacher_feature_grad_norms():  # the gradient each teacher sends into f(I)
      rows = (jnp.zeros(len(aliases), loss.dtype), jnp.eye(len(aliases), dtype=per_teacher.dtype))
      _, per_row = jax.vmap(heads_backward)(rows)
      return jnp.stack([optax.global_norm(jax.tree.map(lambda g: g[i], per_row))
                        for i in range(len(aliases))]).astype(jnp.float32)

    # One program for every step; the extra (heads-only) backward runs when `with_shares` is set.
    norms = jax.lax.cond(with_shares, teacher_feature_grad_norms, lambda: jnp.zeros(len(aliases)))
    shares = {f'grad_norm/{a}': norms[i] for i, a in enumerate(aliases)}
    shares.update({f'grad_share/{a}': norms[i] / (norms.sum() + 1e-12)
                   for i, a in enumerate(aliases)})
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient skips the update: keep the old parameters and moments.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    run_length = jnp.where(finite, 0, state.nonfinite_run + 1)
    new_state = assembly.TrainState(
        step=state.step + 1, params=keep(params, state.params), stats=keep(stats, state.stats),
        opt_state=keep(opt_state, state.opt_state), nonfinite_run=run_length,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
    scalars = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'nonfinite_total': new_state.nonfinite_total, 'nonfinite_run': run_length,
               **terms, **shares}
    return new_state, scalars

  return train_step


def jit_train_step(config, run: assembly.Run, cached: bool = False):
  """The train step jitted with the run's shardings (state donated); see `make_train_step`."""
  batch = lambda ndim: sharding.batch_sharding(run.mesh, config.sharding.rules, ndim)
  if cached:
    teacher_shardings = {alias: {'cls': batch(2), 'patches': batch(4)}
                         for alias in run.teacher_set.specs}
  else:
    teacher_shardings = jax.tree.map(lambda x: x.sharding, run.teacher_set.params)
  images_sharding = batch(3 if cached and config.cache.student_trunk else 4)
  replicated = NamedSharding(run.mesh, P())
  jitted = jax.jit(
      make_train_step(config, run, cached),
      in_shardings=(run.state_shardings, run.frozen_shardings, teacher_shardings,
                    images_sharding, replicated),
      out_shardings=(run.state_shardings, replicated), donate_argnums=(0,))
  # jit with in_shardings takes no defaults: `with_shares` is optional here. `step.lower`
  # gives the compiled program (XLA cost and memory analysis) without a second jit.
  def step(state, frozen, teachers, images, with_shares=False):
    return jitted(state, frozen, teachers, images, with_shares)
  step.lower = jitted.lower
  return step


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------

def evaluate(evaluators: dict, student) -> dict:
  """name -> results of each evaluator on `student`, timed in the log."""
  results = {}
  for name, evaluator in evaluators.items():
    start = time.perf_counter()
    results[name] = evaluator.evaluate(student)
    logging.info('evaluator %s: %.1f s', name, time.perf_counter() - start)
  return results


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so a final checkpoint gets written.

  Single process only. With several processes JAX's preemption service owns SIGTERM: it tells
  every process, and `Checkpointer.reached_preemption` stops them all at the same step (a handler
  here would replace the service's, and the process that got the signal would stop alone)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
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
  run_dir = paths.path(workdir)
  config_dict = json.loads(config.to_json())
  if lead:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(run_dir / 'config.json', json.dumps(config_dict, indent=2))

  mesh = sharding.make_mesh(config)
  sharding.log_mesh(mesh)
  with jax.set_mesh(mesh):
    run = assembly.build_run(config, mesh, stats_lib.stats_dir(config, workdir))
    # With a teacher-target cache the batches carry the teachers' targets for their views.
    cached_targets = bool(config.teacher_cache)
    step_fn = jit_train_step(config, run, cached=cached_targets)
    data = cached if cached_targets else pipeline
    data_iter = data.make_iterator(config, jax.process_index(), jax.process_count())
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                      every=config.checkpoint_every)
    state = run.state
    start = ckpt.latest_step()
    if start is not None:
      state = ckpt.restore(start, assembly.abstract_like(state, run.state_shardings), data_iter)
      logging.info('resumed from step %d', start)
    start = int(state.step)

    evaluators = evals.build(config)
    for name, evaluator in evaluators.items():  # e.g. the untrained student's fidelity
      began = time.perf_counter()
      evaluator.start(inference.from_run(run, run.state))
      logging.info('evaluator %s: started in %.1f s', name, time.perf_counter() - began)
    writer = metrics.MetricsWriter(workdir, enabled=lead, start_step=start)
    progress = metrics.Progress(config.total_steps, start, config.progress if lead else 'none')
    teacher_params = run.teacher_set.params
    pending = []     # (step, scalars on device, host scalars): fetched together at sync points
    last = {}

    def drain() -> dict:
      """Fetches the pending steps' scalars in one transfer and writes all but the last (which
      the caller completes with evaluation results); raises NonFiniteError at the first step
      that ends a run of too many skipped updates."""
      nonlocal pending, t_sync
      fetched = jax.device_get([device for _, device, _ in pending])
      now = time.time()
      elapsed = (now - t_sync) / len(pending)   # the steps ran back to back since the last sync
      records, pending, t_sync = list(zip(pending, fetched)), [], now
      for i, ((step, _, host), device) in enumerate(records):
        scalars = {k: v for k, v in device.items()
                   if host['with_shares'] or not k.startswith(('grad_norm/', 'grad_share/'))}
        scalars.update({'data/skipped': host['skipped'], 'step_time': elapsed,
                        'images_per_s': config.data.batch_size / max(elapsed, 1e-9)})
        if scalars['nonfinite_run'] >= config.max_consecutive_nonfinite:
          writer.write(step, scalars)
          raise NonFiniteError(
              f'{int(scalars["nonfinite_run"])} consecutive non-finite losses or gradients '
              f'at step {step} (config.max_consecutive_nonfinite='
              f'{config.max_consecutive_nonfinite}); the last good checkpoint in '
              f'{ckpt.directory} is intact. Lower config.optim.lr or check the data.')
        if i < len(records) - 1:
          writer.write(step, scalars)
      return scalars

    try:
      with _Preemption() as preemption:
        step, t_sync = start, time.time()
        while step < config.total_steps:
          local = next(data_iter)
          arrays = {key: local[key] for key in ('image', 'trunk', 'targets') if key in local}
          batch = sharding.host_to_global(arrays, mesh, config.sharding.rules)
          every = config.grad_share_every
          with_shares = bool(every and (step + 1) % every == 0)
          # Dispatched asynchronously: the next batch is read while the devices compute.
          teachers = batch['targets'] if cached_targets else teacher_params
          inputs = batch['trunk'] if 'trunk' in batch else batch['image']
          state, scalars = step_fn(state, run.frozen, teachers, inputs, with_shares)
          step += 1
          # 'skipped': bad records dropped for this batch, this process.
          pending.append((step, scalars, {'with_shares': with_shares,
                                          'skipped': local.get('skipped', 0)}))
          due = {n: e for n, e in evaluators.items() if evals.is_due(e, step, config.total_steps)}
          log_step = step % config.log_every == 0
          stop = preemption.requested or ckpt.reached_preemption(step)
          if not (log_step or due or stop or ckpt.is_due(step) or step == config.total_steps):
            continue
          scalars = drain()  # the host waits for the devices only here
          # Async: evaluation below overlaps the write. A stop always saves (once, also when
          # this step is a regular checkpoint step).
          if scalars['nonfinite_run'] == 0 or stop:
            ckpt.save(step, state, data_iter, config_dict,
                      force=stop or step == config.total_steps)
          results = evaluate(due, inference.from_run(run, state)) if due else {}
          if results:
            writer.flush()   # evaluators may read metrics.jsonl (e.g. to plot curves)
          for name, result in results.items():
            scalars.update(evals.scalars(name, result))
            if lead:
              evals.write(workdir, name, evaluators[name], result)
          writer.write(step, scalars)
          last, t_sync = scalars, time.time()   # evaluation time is not step time
          progress.update(step, f'loss {scalars["loss"]:.4f}', log_step)
          if stop:
            ckpt.wait()
            raise Preempted(f'preempted at step {step}; checkpoint written to {ckpt.directory}')
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
    if start >= config.total_steps and evaluators:  # nothing left to train: evaluate only
      for name, result in evaluate(evaluators, inference.from_run(run, state)).items():
        if lead:
          evals.write(workdir, name, evaluators[name], result)
  if jax.process_count() > 1:  # leave together, so no process waits alone at shutdown
    multihost_utils.sync_global_devices('kivfm:train_and_evaluate:end')
  return {k: float(v) for k, v in last.items()}
