"""Training loop: frozen weights, optimizer state, metrics, non-finite guard, resume, preemption."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from kivfm import assembly, config as config_lib, metrics, sharding, train

SMOKE = 'configs/base.py:smoke'


def smoke(**overrides):
  config = config_lib.load(SMOKE)
  for key, value in overrides.items():
    group, _, leaf = key.rpartition('.')
    (config[group] if group else config)[leaf] = value
  return config


def flat(tree):
  return helpers.flat(tree)


def images(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)


def build(config):
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    return helpers.build_run(config, mesh)


def steps(run, config, n, poison=None):
  """n train steps; `poison` = step index at which the teachers output NaN."""
  state, history = run.state, []
  with jax.set_mesh(run.mesh):
    for i in range(n):
      batch = sharding.host_to_global({'image': images(i)}, run.mesh, config.sharding.rules)
      teacher_params = run.teacher_set.params
      if i == poison:
        teacher_params = jax.tree.map(lambda x: x * jnp.nan, teacher_params)
      state, scalars = run.step_fn(state, run.frozen, teacher_params, batch['image'])
      history.append((jax.device_get(state.params), jax.device_get(scalars)))
  return state, history


def test_only_adapter_and_unifier_train_and_have_optimizer_state():
  config = smoke()
  run = build(config)
  trainable = flat(run.state.params)
  assert trainable and all('/adapter/' in p or p.startswith('unifier/') for p in trainable)
  frozen = flat(run.frozen)
  assert 'student/vit/blocks/0/attn/query/kernel' in frozen
  assert not set(frozen) & set(trainable)
  adam = run.state.opt_state[1][0]
  assert set(flat(adam.mu)) == set(trainable) == set(flat(adam.nu))
  # The student's frozen ViT is the knowledge-base teacher's ViT, bit for bit.
  kb = flat(run.teacher_set.params['dino']['model'])
  for path, value in kb.items():
    np.testing.assert_array_equal(frozen['student/vit/' + path], value)


def test_frozen_weights_bit_identical_after_training():
  config = smoke()
  run = build(config)
  frozen_before = jax.device_get(run.frozen)
  teachers_before = jax.device_get(run.teacher_set.params)
  start = flat(jax.device_get(run.state.params))
  state, history = steps(run, config, 3)
  assert all(np.isfinite(h[1]['loss']) for h in history)
  for before, after in [(frozen_before, run.frozen), (teachers_before, run.teacher_set.params)]:
    for path, value in flat(before).items():
      np.testing.assert_array_equal(np.asarray(flat(after)[path]), value, err_msg=path)
  end = flat(jax.device_get(state.params))
  assert any(not np.array_equal(start[p], end[p]) for p in start), 'nothing was trained'


def test_full_fine_tuning_trains_the_base():
  config = smoke(**{'student.adapter': 'none'})
  config.optim.groups = (('student/.*', 0.1), ('unifier/.*', 1.0))
  run = build(config)
  assert 'student/vit/blocks/0/attn/query/kernel' in flat(run.state.params)
  assert not flat(run.frozen)


def test_non_finite_step_is_skipped_and_counted():
  config = smoke()
  run = build(config)
  state, history = steps(run, config, 3, poison=1)
  (p0, s0), (p1, s1), (p2, s2) = history
  assert np.isfinite(s0['loss']) and not np.isfinite(s1['loss']) and np.isfinite(s2['loss'])
  assert (s0['nonfinite_total'], s1['nonfinite_total'], s2['nonfinite_total']) == (0, 1, 1)
  assert (s1['nonfinite_run'], s2['nonfinite_run']) == (1, 0)
  for path, value in flat(p0).items():   # the poisoned step changed nothing
    np.testing.assert_array_equal(flat(p1)[path], value)
  assert any(not np.array_equal(flat(p2)[p], v) for p, v in flat(p1).items())


def test_consecutive_non_finite_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
  config = smoke(total_steps=30, checkpoint_every=1, max_consecutive_nonfinite=3)
  config.optim.update(lr=1e30, warmup_steps=0, clip_norm=0.0)
  with pytest.raises(train.NonFiniteError, match='3 consecutive non-finite .* intact'):
    train.train_and_evaluate(config, str(tmp_path))
  records = metrics.read_jsonl(tmp_path / 'metrics.jsonl')
  last_finite = max(r['step'] for r in records if r['nonfinite_run'] == 0)
  assert records[-1]['nonfinite_run'] == 3
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints'))[-1] == last_finite


class FeatureNormEvaluator:
  """A plug-in evaluator for the test: mean global-feature norm of the student, and of its
  prediction of teacher vitb, on fixed images."""
  DEFAULTS = dict(images=4)
  instances = []

  def __init__(self, options, config):
    self.options, self.calls = options, []
    self.images = images(99)[:options.images]
    self.instances.append(self)

  def start(self, student):
    self.calls.append('start')

  def evaluate(self, student):
    self.calls.append('evaluate')
    norm = lambda x: float(np.linalg.norm(np.asarray(x), axis=-1).mean())
    return {'student': norm(student.features(self.images)['cls']),
            'as_teacher': {'vitb': norm(student.as_teacher('vitb')(self.images)['cls'])}}

  def write(self, results, workdir):
    (Path(workdir) / 'eval' / 'norms.txt').write_text(json.dumps(results))


def test_smoke_run_writes_metrics_config_tensorboard_and_checkpoints(tmp_path, monkeypatch):
  from kivfm import evals
  monkeypatch.setitem(evals.EVALUATORS, 'norms', FeatureNormEvaluator)
  config = smoke()
  config.evals.norms = config_lib.evaluator('norms', every=10, images=2)
  final = train.train_and_evaluate(config, str(tmp_path))
  records = metrics.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, 21))
  for key in ('loss', 'loss/dino', 'loss/vitb', 'lr', 'grad_norm', 'step_time', 'images_per_s',
              'nonfinite_total'):
    assert key in records[0], key
  assert records[-1]['loss'] < records[0]['loss']
  shares = [r for r in records if 'grad_share/dino' in r]
  assert [r["step"] for r in shares] == [10, 20]
  assert all(abs(r['grad_share/dino'] + r['grad_share/vitb'] - 1) < 1e-5 for r in shares)
  for key in ('fidelity/vitb', 'teacher_norm/vitb', 'prediction_norm/vitb', 'shared/vitb',
              'recon/vitb', 's2t/vitb', 'preservation'):
    assert key in records[0], key
  assert final['loss'] == records[-1]['loss']
  # The evaluator plug-in ran before training, at step 10 and at the end, into the metrics,
  # DIR/eval/<name>.json and its own file.
  assert FeatureNormEvaluator.instances[-1].calls == ['start', 'evaluate', 'evaluate']
  evaluated = [r['step'] for r in records if 'eval/norms/student' in r]
  assert evaluated == [10, 20] and 'eval/norms/as_teacher/vitb' in records[-1]
  result = json.loads((tmp_path / 'eval' / 'norms.json').read_text())
  assert result['student'] == pytest.approx(records[-1]['eval/norms/student'])
  assert json.loads((tmp_path / 'eval' / 'norms.txt').read_text()) == result
  assert json.loads((tmp_path / 'config.json').read_text())['teachers']['dino']['name'] == (
      'tiny-dino')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['10', '20']
  # Running the same command again resumes at the end and does nothing.
  train.train_and_evaluate(config, str(tmp_path))
  assert len(metrics.read_jsonl(tmp_path / 'metrics.jsonl')) == 20


def test_restore_onto_a_different_mesh(tmp_path):
  config = smoke(total_steps=10)
  train.train_and_evaluate(config, str(tmp_path))
  saved = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / '10' / 'state')
  config = smoke(total_steps=12)
  config.mesh.shape = (2, 2, 2)
  run = build(config)
  from kivfm import checkpointing
  from kivfm.data import pipeline
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3, every=10)
  state = ckpt.restore(10, assembly.abstract_like(run.state, run.state_shardings),
                       pipeline.make_iterator(config, 0, 1))
  ckpt.close()
  for path, value in flat(state.params).items():
    assert value.sharding == flat(run.state.params)[path].sharding
    np.testing.assert_array_equal(np.asarray(value), flat(saved['params'])[path])
  train.train_and_evaluate(config, str(tmp_path))   # and training goes on there
  assert metrics.read_jsonl(tmp_path / 'metrics.jsonl')[-1]['step'] == 12


def main_cmd(workdir, *overrides):
  return [sys.executable, '-m', 'kivfm.main', f'--config={SMOKE}', f'--workdir={workdir}',
          '--config.progress=none', *overrides]


def final_params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step),
                                                             'state'))
  return flat(restored['params']), flat(restored['opt_state'])


def wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while not predicate():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() - t0 < timeout, 'timed out'
    time.sleep(0.05)


def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
  args = ('--config.total_steps=120', '--config.checkpoint_every=20')
  subprocess.run(main_cmd(tmp_path / 'a', *args), check=True, capture_output=True, timeout=600)
  proc = subprocess.Popen(main_cmd(tmp_path / 'b', *args), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  wait_for(lambda: (tmp_path / 'b' / 'checkpoints' / '40').exists(), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / 'b' / 'checkpoints' / '120').exists(), 'killed too late'
  subprocess.run(main_cmd(tmp_path / 'b', *args), check=True, capture_output=True, timeout=600)
  (pa, oa), (pb, ob) = final_params(tmp_path / 'a', 120), final_params(tmp_path / 'b', 120)
  for path in pa:
    np.testing.assert_array_equal(pb[path], pa[path], err_msg=path)
  for path in oa:
    np.testing.assert_array_equal(ob[path], oa[path], err_msg=path)
  ra, rb = (metrics.read_jsonl(tmp_path / d / 'metrics.jsonl') for d in 'ab')
  assert [r['step'] for r in rb] == list(range(1, 121))
  assert [r['loss'] for r in rb] == [r['loss'] for r in ra]


@pytest.mark.parametrize('every', [100000, 1])   # 1: the step reached is a checkpoint step
def test_sigterm_writes_a_checkpoint_at_the_step_reached(tmp_path, every):
  proc = subprocess.Popen(main_cmd(tmp_path, '--config.total_steps=100000',
                                   f'--config.checkpoint_every={every}'),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  log = tmp_path / 'metrics.jsonl'
  wait_for(lambda: log.exists() and len(metrics.read_jsonl(log)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
  last = metrics.read_jsonl(log)[-1]['step']
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints'))
  assert saved[-1] == last and (every == 1 or saved == [last])
  assert f'preempted at step {last}' in stderr


def test_rematerialised_blocks_give_the_same_step():
  (_, s_plain), = steps(build(smoke()), smoke(), 1)[1]
  (_, s_remat), = steps(build(smoke(**{'student.remat': True})), smoke(), 1)[1]
  np.testing.assert_allclose(s_remat['loss'], s_plain['loss'], rtol=1e-6)
  np.testing.assert_allclose(s_remat['grad_norm'], s_plain['grad_norm'], rtol=1e-5)


def test_a_step_with_gradient_shares_runs_the_teachers_once(monkeypatch):
  """Shares come from the step's own forward pass: tracing the step calls every teacher once,
  and the shares (computed with this step's statistics) sum to 1."""
  from kivfm import teachers
  config = smoke()
  run = build(config)
  calls = []
  real_call = teachers.Teacher.__call__
  monkeypatch.setattr(teachers.Teacher, '__call__',
                      lambda self, x: calls.append(self.spec.name) or real_call(self, x))
  step = train.make_train_step(config, run)
  with jax.set_mesh(run.mesh):
    batch = sharding.host_to_global({'image': images()}, run.mesh, config.sharding.rules)
    _, scalars = jax.jit(step)(run.state, run.frozen, run.teacher_set.params, batch['image'],
                               True)
  assert sorted(calls) == ['tiny-dino', 'tiny-vit-b']
  scalars = jax.device_get(scalars)
  assert abs(scalars['grad_share/dino'] + scalars['grad_share/vitb'] - 1) < 1e-5
  assert scalars['grad_norm/dino'] > 0 and scalars['grad_norm/vitb'] > 0


@pytest.mark.parametrize('kb_name', ['tiny-dino', 'tiny-dinov3'])
def test_adapters_in_the_last_blocks_share_the_trunk_with_the_knowledge_base(monkeypatch, kb_name):
  """student.adapter_blocks=1: the frozen block below the adapter runs once per step for both the
  student and the knowledge-base teacher (a DINOv2- or DINOv3-shaped one); at step 0 the step
  equals the unshared one."""
  from kivfm.models import vit
  config = smoke(**{'student.adapter_blocks': 1})
  config.teachers.dino.name = kb_name
  run = build(config)
  assert assembly.shares_trunk(config, run)
  trainable = [k for k in flat(run.state.params) if k.startswith('student/')]
  assert trainable and all(k.startswith('student/vit/blocks/1/adapter/') for k in trainable)
  x = jnp.asarray(images())
  with jax.set_mesh(run.mesh):
    teacher = run.teacher_set.forward(run.teacher_set.params, x)['dino']
    student = run.kpu().student(x)
  for key in ('cls', 'patches'):   # step 0: the adapter is a no-op
    np.testing.assert_allclose(student[key], teacher[key], atol=1e-5)

  calls = []
  block_call = vit.Block.__call__
  monkeypatch.setattr(vit.Block, '__call__', lambda self, *a: calls.append(1) or block_call(
      self, *a))

  def trace_and_run():
    calls.clear()
    step = train.make_train_step(config, run)
    with jax.set_mesh(run.mesh):
      jax.make_jaxpr(step)(run.state, run.frozen, run.teacher_set.params, x)
      return len(calls), jax.device_get(jax.jit(step)(
          run.state, run.frozen, run.teacher_set.params, x)[1])

  shared_calls, shared = trace_and_run()
  monkeypatch.setattr(assembly, 'shares_trunk', lambda *_: False)
  plain_calls, plain = trace_and_run()
  # student 2 blocks + teacher dino 2 (1 when shared) + teacher vitb 2
  assert (shared_calls, plain_calls) == (5, 6)
  for key in ('loss', 'loss/dino', 'loss/vitb', 'grad_norm'):
    np.testing.assert_allclose(shared[key], plain[key], rtol=1e-5)


def test_adapter_blocks_out_of_range_is_a_config_error():
  config = smoke(**{'student.adapter_blocks': 3})
  with pytest.raises(config_lib.ConfigError, match='student.adapter_blocks=3 .* 2 blocks'):
    config_lib.validate(config, 8)


def test_bf16_teachers_keep_their_kernels_in_bf16_with_unchanged_outputs():
  config = smoke()
  for alias in config.teachers:
    config.teachers[alias].dtype = 'bfloat16'
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    stored_fp32 = assembly.build_teachers(config, mesh)
    stored_bf16 = assembly.kernels_in_compute_dtype(config, stored_fp32)
    x = jnp.asarray(images())
    for alias in config.teachers:
      dtypes = {k: v.dtype for k, v in flat(stored_bf16.params[alias]).items()}
      assert all(d == jnp.bfloat16 for k, d in dtypes.items() if k.endswith('kernel'))
      assert any(d == jnp.float32 for k, d in dtypes.items() if k.endswith('scale'))
    a = stored_fp32.forward(stored_fp32.params, x)
    b = stored_bf16.forward(stored_bf16.params, x)
    for path, value in flat(a).items():
      np.testing.assert_array_equal(np.asarray(value, np.float32),
                                    np.asarray(flat(b)[path], np.float32))


@pytest.mark.parametrize('trunk', [False, True])
def test_training_from_a_teacher_cache_resumes_exactly(tmp_path, trunk):
  """Cached-teacher training (with `trunk` from the stored student trunk): the loop reads
  targets from the cache, and a run restarted from its step-4 checkpoint ends where the
  uninterrupted run ends."""
  import shutil
  from kivfm import cache
  config = smoke(total_steps=8, checkpoint_every=4, **{'data.num_examples': 16,
                                                       'cache.views': 2, 'cache.batch_size': 8})
  if trunk:
    config.student.adapter_blocks, config.cache.student_trunk = 1, True
  cache.build(config, str(tmp_path / 'cache'))
  config.teacher_cache = str(tmp_path / 'cache' / 'teacher_cache')
  train.train_and_evaluate(config, str(tmp_path / 'a'))
  (tmp_path / 'b' / 'checkpoints').mkdir(parents=True)
  shutil.copytree(tmp_path / 'a' / 'checkpoints' / '4', tmp_path / 'b' / 'checkpoints' / '4')
  train.train_and_evaluate(config, str(tmp_path / 'b'))
  (pa, oa), (pb, ob) = final_params(tmp_path / 'a', 8), final_params(tmp_path / 'b', 8)
  for path in pa:
    np.testing.assert_array_equal(pb[path], pa[path], err_msg=path)
  for path in oa:
    np.testing.assert_array_equal(ob[path], oa[path], err_msg=path)
  records = metrics.read_jsonl(tmp_path / 'a' / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, 9))
  assert all(np.isfinite(r['loss']) for r in records)


def test_bf16_step_with_gradient_shares():
  config = smoke(dtype='bfloat16')
  for alias in config.teachers:
    config.teachers[alias].dtype = 'bfloat16'
  run = build(config)
  with jax.set_mesh(run.mesh):
    x = sharding.host_to_global({'image': images()}, run.mesh, config.sharding.rules)['image']
    _, scalars = run.step_fn(run.state, run.frozen, run.teacher_set.params, x, True)
  shares = [float(v) for k, v in scalars.items() if k.startswith('grad_share/')]
  assert np.isfinite(float(scalars['loss'])) and sum(shares) == pytest.approx(1.0, abs=1e-3)
