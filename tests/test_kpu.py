"""The KPU model: step-0 identity, balanced transfer across teachers, no collapse, EMA stats."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kivfm import assembly, config as config_lib, losses, sharding, teachers, train

import helpers
from helpers import build_run
from kivfm.data import synthetic, transforms
from kivfm.models.student import Student


@pytest.mark.parametrize('kb_name,adapter', [
    ('tiny-dino', 'bottleneck'), ('tiny-dino', 'lora'), ('tiny-dino', 'none'),
    ('tiny-dinov3', 'bottleneck'), ('tiny-dinov3', 'lora')])
def test_student_equals_knowledge_base_at_step_zero(kb_name, adapter):
  kb = teachers.build(kb_name, dtype=jnp.float32, seed=3)
  spec = kb.spec
  student = Student(spec.arch, image_size=spec.image_size, mean=spec.mean, std=spec.std,
                    adapter=adapter, adapter_dim=8, rngs=nnx.Rngs(7))
  nnx.update(student.vit, nnx.state(kb.model))   # the student inherits the teacher's weights
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  want, got = kb(images), student(images)
  np.testing.assert_array_equal(np.asarray(got['cls']), np.asarray(want['cls']))
  np.testing.assert_array_equal(np.asarray(got['patches']), np.asarray(want['patches']))


def imbalance_run(shared_dim, normalizer, steps=150):
  """Two copies of one tiny teacher, the second with 100x larger features; MSE distances."""
  config = config_lib.load('configs/base.py:smoke')
  config.teachers.vitb.name = 'tiny-dino'
  config.unifier.update(shared_dim=shared_dim, normalizer=normalizer, hidden=32)
  config.loss.update(patch='mse', global_='mse', preservation_weight=0.0)
  config.optim.update(warmup_steps=10, lr=3e-3)
  config.total_steps = steps
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = build_run(config, mesh)
    params = jax.device_get(run.teacher_set.params)
    params['vitb'] = copy.deepcopy(params['dino'])
    norm = params['vitb']['model']['norm']
    norm['scale'], norm['bias'] = norm['scale'] * 100, norm['bias'] * 100
    params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, run.teacher_set.params))
    source, rng, state = synthetic.SyntheticImages(256, 64), np.random.default_rng(0), run.state
    for _ in range(steps):
      views = np.stack([transforms.crop_and_flip(source[int(i)]['image'], 32, rng)
                        for i in rng.integers(0, 256, 8)])
      batch = sharding.host_to_global({'image': views}, mesh, config.sharding.rules)
      state, scalars = run.step_fn(state, run.frozen, params, batch['image'])
  return state, jax.device_get(scalars)


def test_shared_latent_space_balances_teachers_of_different_magnitude():
  _, base = imbalance_run(0, 'none')
  _, kpu = imbalance_run(64, 'ema_zscore')
  # Teacher-space baseline: the large teacher owns the loss, and the two identical-but-for-scale
  # teachers end far apart in fidelity (measured: 0.90 vs 0.72 patch cosine after 150 steps).
  assert base['teacher_norm/vitb'] > 50 * base['teacher_norm/dino']
  assert base['loss/vitb'] > 100 * base['loss/dino']
  assert base['fidelity/dino'] - base['fidelity/vitb'] > 0.1
  # Shared latent space + normalised targets: comparable fidelity (measured gap 0.003).
  assert abs(kpu['fidelity/dino'] - kpu['fidelity/vitb']) < 0.03
  assert abs(kpu['fidelity_cls/dino'] - kpu['fidelity_cls/vitb']) < 0.05
  assert min(kpu['fidelity/dino'], kpu['fidelity/vitb']) > base['fidelity/vitb'] + 0.1


def test_constant_teacher_codes_cannot_zero_the_shared_loss():
  config = config_lib.load('configs/base.py:smoke')
  config.unifier.update(normalizer='ema_zscore', hidden=32)
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = build_run(config, mesh)
    images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    targets = run.teacher_set.forward(run.teacher_set.params, images)
    model = run.kpu()
    model.unifier.update_stats(targets)
    for encoder in model.unifier.encode.values():      # collapse every teacher encoder
      encoder.kernel[...] = jnp.zeros_like(encoder.kernel[...])
    weights = {a: 1.0 for a in targets}
    _, terms = losses.objective(model(images, targets), targets, weights, 'dino', config.loss)
  for alias in targets:
    # A constant code reconstructs at best the per-channel mean: error ~ the unit variance of the
    # normalised targets, so the shared-space objective stays far from zero.
    assert terms[f'recon/{alias}'] > 0.5, terms


def test_ema_statistics_move_and_are_part_of_the_state():
  config = config_lib.load('configs/base.py:smoke')
  config.unifier.normalizer = 'ema_zscore'
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = build_run(config, mesh)
    images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    batch = sharding.host_to_global({'image': images}, mesh, config.sharding.rules)
    before = jax.device_get(run.state.stats)
    state, _ = run.step_fn(run.state, run.frozen, run.teacher_set.params, batch['image'])
  after = jax.device_get(state.stats)
  norm = after['unifier']['norm']['vitb']['patches']
  assert int(norm['count']) == 1
  assert not np.allclose(norm['mean'], before['unifier']['norm']['vitb']['patches']['mean'])
  assert 'stats' in assembly.TrainState.__dataclass_fields__   # checkpointed with the state


def test_fixed_statistics_from_the_command_feed_phi_s(tmp_path):
  from kivfm import compute_stats
  from kivfm.models import normalizers
  from kivfm.stats import FeatureStats, stats_path
  config = config_lib.load('configs/ablations/normalizer.py:norm=phi_s,smoke')
  computed = compute_stats.compute(config, str(tmp_path), batches=3, tokens_per_image=8)
  assert computed['dino']['patches'].count == 3 * 8 * 8
  directory = str(tmp_path / 'teacher_stats')
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = build_run(config, mesh, directory)
    images = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    batch = sharding.host_to_global({'image': images}, mesh, config.sharding.rules)
    before = jax.device_get(run.state.stats)
    state, scalars = run.step_fn(run.state, run.frozen, run.teacher_set.params, batch['image'])
  assert np.isfinite(scalars['loss'])
  want = normalizers.PhiS.from_stats(
      FeatureStats.load(stats_path(directory, 'vitb', 'patches')).mean,
      FeatureStats.load(stats_path(directory, 'vitb', 'patches')).cov)
  got = jax.device_get(state.stats)['unifier']['norm']['vitb']['patches']
  np.testing.assert_allclose(got['rotation'], np.asarray(want.rotation[...]), atol=1e-6)
  # Fixed statistics do not move with training.
  np.testing.assert_array_equal(got['mean'], before['unifier']['norm']['vitb']['patches']['mean'])
  with pytest.raises(config_lib.ConfigError, match='python -m kivfm.compute_stats'):
    build_run(config, mesh, str(tmp_path / 'nowhere'))


def test_trained_student_features_and_stand_in_for_teachers(tmp_path):
  from kivfm import inference
  config = config_lib.load('configs/base.py:smoke')
  config.total_steps = 10
  train.train_and_evaluate(config, str(tmp_path))
  student = inference.load(str(tmp_path))
  images = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  feats = student.features(images)
  assert feats['cls'].shape == (2, 32) and feats['patches'].shape == (2, 4, 4, 32)
  as_vitb = student.as_teacher('vitb')(images)
  assert as_vitb['cls'].shape == (2, 48) and as_vitb['patches'].shape == (2, 6, 6, 48)
  model = student.model
  direct = model.unifier.to_teacher_space('vitb', model.unifier(model.student(images))['vitb'])
  np.testing.assert_allclose(np.asarray(as_vitb['patches']), np.asarray(direct['patches']),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(KeyError, match="no teacher 'clip'"):
    student.as_teacher('clip')


def test_head_distances_by_hand():
  """KL of the classifier's softmax (x T^2), saliency BCE minus the teacher's entropy, cosine."""
  pred, target = jnp.log(jnp.array([[0.25, 0.75]])), jnp.log(jnp.array([[0.5, 0.5]]))
  kl = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
  np.testing.assert_allclose(losses.head_distance('logits', pred, target), kl, rtol=1e-5)
  np.testing.assert_allclose(losses.head_distance('logits', 2 * pred, 2 * target, 2.0), 4 * kl,
                             rtol=1e-5)
  p, t = jnp.array([0.2, 0.9]), jnp.array([0.5, 0.9])
  bce = np.mean([0.5 * np.log(0.5 / 0.2) + 0.5 * np.log(0.5 / 0.8), 0.0])
  np.testing.assert_allclose(losses.head_distance('saliency', p, t), bce, rtol=1e-4)
  assert abs(float(losses.head_distance('saliency', t, t))) < 1e-6
  np.testing.assert_allclose(losses.head_distance('embedding', jnp.array([[1., 0.]]),
                                                  jnp.array([[1., 1.]])), 1 - 2 ** -0.5, rtol=1e-5)
  with pytest.raises(ValueError, match="'masks'"):
    losses.head_distance('masks', p, t)


def test_distillation_through_the_teachers_heads():
  """loss.head_weight adds, per teacher with native heads, the distance between what its heads
  make of the student's prediction and of its own features; the term trains the student."""
  config = config_lib.load('configs/base.py:smoke')
  del config.teachers['vitb']
  config.teachers.effnet = config_lib.teacher('efficientnet-lite0', weights='random',
                                              dtype='float32', image_size=32)
  config.loss.head_weight = 1.0
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = build_run(config, mesh)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8))
    targets = jax.jit(run.teacher_set.forward)(run.teacher_set.params, x)
    outputs = nnx.jit(lambda model: model(x, targets))(run.kpu())
    effnet = nnx.merge(run.teacher_set.graphdefs['effnet'],
                       nnx.State(run.teacher_set.params['effnet']))
    logits = nnx.jit(lambda m, f: m.native_heads(f))(effnet, outputs['in_teacher_space']['effnet']
                                                     )['logits']
    weights = {'dino': 1.0, 'effnet': 1.0}
    _, without = losses.objective(outputs, targets, weights, 'dino', config.loss)
    _, terms = losses.objective({**outputs, 'heads': {'effnet': {'logits': logits}}}, targets,
                                weights, 'dino', config.loss)
    want = losses.head_distance('logits', logits, targets['effnet']['logits'])
    np.testing.assert_allclose(terms['head/effnet'], want, rtol=1e-6)
    np.testing.assert_allclose(terms['loss/effnet'], without['loss/effnet'] + want, rtol=1e-5)
    assert 0 <= terms['head_agreement/effnet'] <= 1 and 'head/dino' not in terms

    # The gradient of the head term reaches the student's adapters.
    def head_loss(params):
      out = nnx.merge(run.kpu_graphdef, nnx.State(params), nnx.State(run.state.stats),
                      nnx.State(run.frozen))(x, targets)
      got = effnet.native_heads(out['in_teacher_space']['effnet'])['logits']
      return losses.head_distance('logits', got, targets['effnet']['logits'])
    grads = helpers.flat(jax.jit(jax.grad(head_loss))(run.state.params))
    assert any(k.startswith('student/') and float(jnp.abs(g).max()) > 0 for k, g in grads.items())
    # The train step adds the term (traced only: the values are checked above).
    step = train.make_train_step(config, run)
    _, scalars = jax.eval_shape(step, run.state, run.frozen, run.teacher_set.params, x)
  assert {'head/effnet', 'head_agreement/effnet'} <= set(scalars)


def test_head_distillation_config_errors():
  config = config_lib.load('configs/base.py:smoke')
  config.loss.head_outputs = ('logits', 'masks')
  with pytest.raises(config_lib.ConfigError, match="loss.head_outputs='masks'"):
    config_lib.validate(config, jax.device_count())
  config.loss.head_outputs = ('logits',)
  config.loss.head_weight, config.teacher_cache = 0.5, '/tmp/cache'
  with pytest.raises(config_lib.ConfigError, match='head_weight.*teacher_cache'):
    config_lib.validate(config, jax.device_count())
