"""Teacher-target cache: views rebuilt exactly, targets equal to the online teachers' on them,
manifest checks, resumable building shared by processes, checkpointable reading, and a train
step on a cached batch. Tiny random teachers (configs/base.py:smoke) on synthetic images."""
import os
import re
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from kivfm import assembly, cache, config as config_lib, sharding, train
from kivfm.data import cached, transforms
from kivfm.errors import ConfigError, DataUnavailableError


def tiny_config(directory, **cache_settings):
  config = config_lib.load('configs/base.py:smoke')
  config.data.update(num_examples=20, batch_size=8)
  config.cache.update(views=2, chunk_examples=8, batch_size=16, pca_fit_examples=4,
                      pca_dim=(('vitb', 16),))
  config.cache.update(**cache_settings)
  config.teacher_cache = str(directory)
  return config


def validated_build(config):
  """`config`, validated, and the manifest of the cache built for it."""
  config_lib.validate(config, jax.device_count())
  return config, cache.build(config, workdir='unused')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """A complete int8 cache with PCA on teacher vitb: 20 examples x 2 views in 3 chunks."""
  return validated_build(tiny_config(tmp_path_factory.mktemp('cache') / 'teacher_cache'))


def files(directory):
  return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# Views.
# --------------------------------------------------------------------------------------------

def crop_and_flip_before_the_split(image, size, rng, scale):
  """transforms.crop_and_flip as it was before sample_view / apply_view, verbatim."""
  top, left, h, w = transforms.random_resized_crop_box(*image.shape[:2], rng, scale)
  crop = Image.fromarray(image[top:top + h, left:left + w])
  out = np.asarray(crop.resize((size, size), Image.BILINEAR, reducing_gap=None))
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


@pytest.mark.parametrize('shape', [(28, 28), (40, 90), (90, 12)])
@pytest.mark.parametrize('scale', [(0.35, 1.0), (0.05, 0.2)])
def test_crop_and_flip_is_unchanged_by_the_split(shape, scale):
  image = np.random.default_rng(0).integers(0, 256, (*shape, 3), np.uint8)
  for seed in range(25):
    new, old = np.random.default_rng(seed), np.random.default_rng(seed)
    np.testing.assert_array_equal(transforms.crop_and_flip(image, 32, new, scale),
                                  crop_and_flip_before_the_split(image, 32, old, scale))
    assert new.random() == old.random()   # the same draws, in the same order
    box, flip = transforms.sample_view(*shape, np.random.default_rng(seed), scale)
    np.testing.assert_array_equal(transforms.apply_view(image, 32, box, flip),
                                  transforms.crop_and_flip(image, 32,
                                                           np.random.default_rng(seed), scale))


# --------------------------------------------------------------------------------------------
# Encoding.
# --------------------------------------------------------------------------------------------

def random_targets(rng, n=6, width=24, grid=(3, 4)):
  patches = rng.normal(size=(n, *grid, width)).astype(np.float32)
  patches[..., 5] *= 300                  # an outlier channel
  patches[..., 7] = 0                     # a dead channel
  return {'t': {'cls': rng.normal(size=(n, width)).astype(np.float32) * 4, 'patches': patches}}


def meta(n):
  return {'source': np.zeros(n), 'index': np.arange(n), 'view': np.zeros(n), 'label': -np.ones(n),
          'box': np.tile([0, 0, 5, 5], (n, 1)), 'flip': np.arange(n) % 2}


def test_codecs_stay_within_their_precision():
  rng = np.random.default_rng(0)
  targets = random_targets(rng)
  x = targets['t']
  bf16 = cached.Codec('bfloat16', {'t': (24, (3, 4))})
  out = bf16.decode(bf16.encode(meta(6), targets), ['t'])['t']
  for kind in ('cls', 'patches'):
    np.testing.assert_allclose(out[kind], x[kind], rtol=2 ** -8, atol=0)
  int8 = cached.Codec('int8', {'t': (24, (3, 4))})
  rows = int8.encode(meta(6), targets)
  assert rows.dtype.itemsize == int8.record_dtype.itemsize and (rows['index'] == range(6)).all()
  out = int8.decode(rows, ['t'])['t']
  # Per-channel scales: each channel (the outlier one too) within half a step of its own range.
  step = np.abs(x['patches']).max(axis=(1, 2), keepdims=True) / 127
  assert (np.abs(out['patches'] - x['patches']) <= step * 0.501 + 1e-30).all()
  assert (out['patches'][..., 7] == 0).all()
  step = np.abs(x['cls']).max(axis=-1, keepdims=True) / 127
  assert (np.abs(out['cls'] - x['cls']) <= step * 0.501).all()
  # PCA: patch vectors in the kept subspace come back (up to int8), at full width.
  components = np.linalg.qr(rng.normal(size=(24, 6)))[0].astype(np.float32)
  mean = rng.normal(size=24).astype(np.float32)
  x['patches'] = (rng.normal(size=(6, 3, 4, 6)) @ components.T + mean).astype(np.float32)
  pca = cached.Codec('int8', {'t': (24, (3, 4))}, {'t': (mean, components)})
  assert pca.record_dtype.itemsize < int8.record_dtype.itemsize
  out = pca.decode(pca.encode(meta(6), targets), ['t'])['t']
  assert out['patches'].shape == (6, 3, 4, 24)
  np.testing.assert_allclose(out['patches'], x['patches'], atol=0.05)
  x['cls'][0, 0] = np.nan
  with pytest.raises(ValueError, match='teacher t: non-finite'):
    int8.encode(meta(6), targets)


@pytest.mark.parametrize('dtype', ['int8', 'bfloat16'])
def test_the_student_trunk_round_trips_within_its_precision(dtype):
  rng = np.random.default_rng(1)
  targets = random_targets(rng)
  trunk = rng.normal(size=(6, 13, 24)).astype(np.float32)
  trunk[:, 0] *= 20                       # an outlier token (the class token)
  trunk[..., 3] *= 300                    # an outlier channel
  codec = cached.Codec(dtype, {'t': (24, (3, 4))}, trunk=(13, 24))
  plain = cached.Codec(dtype, {'t': (24, (3, 4))})
  rows = codec.encode(meta(6), targets, trunk)
  assert codec.record_dtype.itemsize > plain.record_dtype.itemsize
  assert_same(codec.decode(rows, ['t']), plain.decode(plain.encode(meta(6), targets), ['t']))
  got = codec.decode_trunk(rows)
  if dtype == 'bfloat16':
    np.testing.assert_allclose(got, trunk, rtol=2 ** -8, atol=0)
  else:   # per channel, over the tokens
    step = np.abs(trunk).max(axis=1, keepdims=True) / 127
    assert (np.abs(got - trunk) <= step * 0.501).all()
  manifest = {'encoding': {**codec.describe(), 'codec': ''}}
  assert manifest['encoding']['trunk'] == {'tokens': 13, 'width': 24}
  assert cached.Codec.from_manifest(manifest, 'unused').record_dtype == codec.record_dtype


# --------------------------------------------------------------------------------------------
# Building and reading.
# --------------------------------------------------------------------------------------------

def assert_within_half_step(got, want, axis):
  """int8 with scales over `axis`: |got - want| <= half a step (+ float noise of the forward)."""
  half = np.abs(want).max(axis=axis, keepdims=True) / 254
  error = np.abs(got - want) / (half * 1.01 + 1e-5)
  assert error.max() <= 1, f'{error.max():.3f} half steps'


def test_records_are_the_recorded_views_with_the_online_teachers_targets(built):
  config, manifest = built
  assert manifest['records'] == 40 and manifest['skipped_examples'] == 0
  assert len(manifest['shards']) == 3 and manifest['encoding']['codec']
  identity = manifest['identity']
  assert identity['config.teachers.dino.weights'] == 'random:1000'
  assert identity['config.teachers.vitb.image_size'] == 48
  parts = cached.open_parts(config.data)
  codec = cached.Codec.from_manifest(manifest, config.teacher_cache)
  source = grain.sources.ArrayRecordDataSource(
      [os.path.join(config.teacher_cache, s['file']) for s in manifest['shards']])
  rows = np.frombuffer(b''.join(source[i] for i in range(len(source))), codec.record_dtype)
  assert sorted(zip(rows['index'], rows['view'])) == [(i, k) for i in range(20) for k in (0, 1)]
  for row in rows:   # box and flip are the draws of view_rng(shuffle_seed, source, index, view)
    image = parts[0][int(row['index'])]['image']
    rng = cache.view_rng(config.data.shuffle_seed, 0, int(row['index']), int(row['view']))
    box, flip = transforms.sample_view(*image.shape[:2], rng, config.data.crop_scale)
    assert (tuple(row['box']), bool(row['flip'])) == (box, flip)

  batch = next(cached.make_iterator(config, 0, 1))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['skipped'] == 0
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    teacher_set = assembly.build_teachers(config, mesh)
    online, trunk = jax.device_get(cache.make_forward(teacher_set)(teacher_set.params,
                                                                     batch['image']))
  assert trunk is None
  mean, components = codec.pca['vitb']
  for j in range(8):
    # The image is exactly one recorded view of its example, rebuilt from its box and flip.
    image = parts[0][int(batch['index'][j])]['image']
    mine = rows[rows['index'] == batch['index'][j]]
    assert any(np.array_equal(transforms.apply_view(image, 32, r['box'], bool(r['flip'])),
                              batch['image'][j]) for r in mine)
  # int8: every value within half a quantisation step (per channel of the patch map, per
  # vector for cls) of the online target; the PCA teacher in its kept components.
  got, want = batch['targets']['dino'], online['dino']
  assert_within_half_step(got['patches'], want['patches'], axis=(1, 2))
  assert_within_half_step(got['cls'], want['cls'], axis=-1)
  assert_within_half_step((batch['targets']['vitb']['patches'] - mean) @ components,
                          (online['vitb']['patches'] - mean) @ components, axis=(1, 2))
  assert batch['targets']['vitb']['patches'].shape == (8, 6, 6, 48)


def test_epochs_cover_every_record_per_process_and_resume_exactly(built):
  config, _ = built
  seen = []
  for process in range(2):   # 20 records each: 5 batches of 4 per epoch
    iterator = cached.make_iterator(config, process, 2)
    epoch = take(iterator, 5)
    assert all(b['image'].shape == (4, 32, 32, 3) for b in epoch)
    seen.extend(np.concatenate([b['index'] for b in epoch]))
  assert np.bincount(seen).tolist() == [2] * 20   # every example's 2 views once

  iterator = cached.make_iterator(config, 0, 1)
  take(iterator, 4)
  state = iterator.get_state()
  expected = take(iterator, 3)     # across the epoch boundary
  resumed = cached.make_iterator(config, 0, 1)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 3)):
    assert_same(x, y)


def test_an_example_gone_bad_is_skipped_and_counted(built):
  config, manifest = built

  class OneBad:
    def __init__(self, part):
      self.part, self.name = part, part.name

    def __len__(self):
      return len(self.part)

    def __getitem__(self, index):
      return {'bad': 'gone'} if index == 3 else self.part[index]

  parts = [OneBad(p) for p in cached.open_parts(config.data)]
  iterator = iter(cached.make_dataset(config, config.teacher_cache, manifest, parts))
  batches = take(iterator, 10)
  assert 3 not in np.concatenate([b['index'] for b in batches])
  assert sum(b['skipped'] for b in batches) == iterator.get_state()['next_index'] - 80


def test_manifest_mismatches_name_the_field(built, monkeypatch):
  config, _ = built
  where = config.teacher_cache
  cached.check_manifest(config, where)
  changes = {
      'teachers.dino.image_size': (40, rf'config\.teachers\.dino\.image_size=40 but the cache '
                                       rf'at {re.escape(where)} was built with 32'),
      'seed': (1, r"config\.teachers\.vitb\.weights='random:2001' .* 'random:2000'"),
      'data.crop_scale': ((0.5, 1.0), r'config\.data\.crop_scale=\[0\.5, 1\.0\] .* \[0\.35, 1'),
      'data.shuffle_seed': (3, r'config\.data\.shuffle_seed=3 .* built with 0'),
      'data.image_size': (48, r'config\.data\.image_size=48 .* built with 32'),
      'data.num_examples': (21, r'data sizes .*: this config gives \[21\] .* \[20\]'),
      'teachers.dino.dtype': ('bfloat16', r"teachers\.dino\.dtype='bfloat16' .* 'float32'"),
  }
  for key, (value, message) in changes.items():
    changed = tiny_config(where)
    group, _, leaf = key.rpartition('.')
    (changed[group] if group else changed)[leaf] = value
    with pytest.raises(ConfigError, match=message):
      cached.check_manifest(changed, where)
  changed = tiny_config(where)   # the encoding is read from the manifest: training may differ
  changed.cache.update(views=3, dtype='bfloat16', pca_dim=())
  cached.check_manifest(changed, where)
  changed = tiny_config(where)
  changed.teachers.extra = config_lib.teacher('tiny-dino', weights='random')
  with pytest.raises(ConfigError, match="teachers.extra: .* no targets of teacher 'extra'"):
    cached.check_manifest(changed, where)
  monkeypatch.setattr(cached, 'code_version', lambda: 'edited')
  with pytest.raises(ConfigError, match=r"code version .* gives 'edited'"):
    cached.check_manifest(config, where)


def test_missing_cache_names_the_command(tmp_path):
  config = tiny_config(tmp_path / 'nothing')
  with pytest.raises(DataUnavailableError,
                     match=r'does not exist\. Build it with: python -m kivfm\.cache .*'
                           rf'--config\.teacher_cache={re.escape(str(tmp_path))}/nothing'):
    cached.make_iterator(config, 0, 1)


def test_interrupted_build_resumes_and_processes_share_it(built, tmp_path, monkeypatch):
  """Killed in its second chunk, then finished by 'process 1 of 2' and 'process 0 of 2': the
  same bytes as the uninterrupted single-process build."""
  built_config, manifest = built
  config = tiny_config(tmp_path / 'cache')
  written = []
  real = cache._write_chunk

  class Killed(BaseException):
    pass

  def interrupted(batches):
    yield next(batches)
    raise Killed

  def failing(path, batches):
    if written:   # the second chunk dies after its first batch
      batches = interrupted(batches)
    real(path, batches)
    written.append(path)

  monkeypatch.setattr(cache, '_write_chunk', failing)
  with pytest.raises(Killed):
    cache.build(config, 'unused')
  monkeypatch.undo()
  assert len(written) == 1 and sorted(os.listdir(tmp_path / 'cache')) == [
      f'codec-{manifest["key"]}.npz', os.path.basename(written[0])]   # no partial file left
  with pytest.raises(DataUnavailableError, match=r'incomplete \(1 chunk files'):
    cached.check_manifest(config, config.teacher_cache)

  assert cache.build(config, 'unused', process_index=1, process_count=2) is None
  assert len(os.listdir(tmp_path / 'cache')) == 3          # chunk 1 is process 1's
  assert cache.build(config, 'unused', process_index=0, process_count=2) == manifest
  assert files(tmp_path / 'cache') == files(Path(built_config.teacher_cache))


# --------------------------------------------------------------------------------------------
# Training on it.
# --------------------------------------------------------------------------------------------

def test_a_train_step_runs_on_a_cached_batch_of_a_subset_of_its_teachers(built):
  """A config with fewer teachers than the cache is served (and trains faster here)."""
  config = tiny_config(built[0].teacher_cache, pca_dim=())
  del config.teachers['vitb']
  batch = next(cached.make_iterator(config, 0, 1))
  assert set(batch['targets']) == {'dino'}
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = assembly.build_run(config, mesh)
    step = train.jit_train_step(config, run, cached=True)
    targets, images = sharding.host_to_global((batch['targets'], batch['image']), mesh,
                                              config.sharding.rules)
    state, scalars = step(run.state, run.frozen, targets, images, False)
  scalars = jax.device_get(scalars)
  assert int(state.step) == 1
  assert all(np.isfinite(v) for v in scalars.values()) and scalars['loss'] > 0


# --------------------------------------------------------------------------------------------
# The student's trunk in the cache.
# --------------------------------------------------------------------------------------------

def trunk_config(directory, **cache_settings):
  config = tiny_config(directory, **{'pca_dim': (), 'student_trunk': True, **cache_settings})
  config.student.adapter_blocks = 1     # tiny-dino has 2 blocks: the trunk is block 0
  return config


@pytest.fixture(scope='module')
def built_trunk(tmp_path_factory):
  return validated_build(trunk_config(tmp_path_factory.mktemp('trunk') / 'teacher_cache'))


def step_on(config, run, batch, key):
  """Loss and updated parameters of one cached train step on `batch[key]`."""
  step = train.jit_train_step(config, run, cached=True)
  targets, inputs = sharding.host_to_global((batch['targets'], batch[key]), run.mesh,
                                            config.sharding.rules)
  state = jax.tree.map(lambda x: x.copy(), run.state)
  state, scalars = step(state, run.frozen, targets, inputs, False)
  return float(scalars['loss']), jax.device_get(state.params)


def test_a_cached_trunk_is_the_students_and_trains_as_the_views_do(built_trunk):
  config, manifest = built_trunk
  assert manifest['encoding']['trunk'] == {'tokens': 1 + 4 * 4, 'width': 32}
  assert manifest['identity']['config.student.adapter_blocks'] == 1
  batch = next(cached.make_iterator(config, 0, 1))
  assert 'image' not in batch and batch['trunk'].shape == (8, 17, 32)
  # The same records with their views rebuilt (the same shuffle): the trunk is the student's.
  view_config = trunk_config(config.teacher_cache, student_trunk=False)
  views = next(cached.make_iterator(view_config, 0, 1))
  assert_same(views['index'], batch['index'])
  assert_same(views['targets'], batch['targets'])
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = assembly.build_run(config, mesh)
    student = nnx.merge(run.kpu_graphdef, nnx.State(run.state.params), nnx.State(run.state.stats),
                        nnx.State(run.frozen)).student
    tokens, grid = jax.jit(student.trunk)(views['image'])
    assert grid == student.grid == (4, 4)
    assert_within_half_step(batch['trunk'], np.asarray(tokens), axis=1)
    loss, params = step_on(config, run, batch, 'trunk')
    view_loss, view_params = step_on(view_config, run, views, 'image')
  assert loss == pytest.approx(view_loss, rel=1e-3)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(view_params)):
    np.testing.assert_allclose(x, y, rtol=0, atol=2e-5)


def test_a_trunk_cache_needs_matching_settings(built, built_trunk):
  trunk_dir, plain_dir = built_trunk[0].teacher_cache, built[0].teacher_cache
  config = trunk_config(trunk_dir)
  config.student.adapter_blocks = 2
  with pytest.raises(ConfigError, match=r'config\.student\.adapter_blocks=2 but the cache .* '
                                        r'built with 1'):
    cached.check_manifest(config, trunk_dir)
  with pytest.raises(ConfigError, match=r'student_trunk=True but the cache at .* holds no '
                                        r'student trunk'):
    cached.check_manifest(trunk_config(plain_dir), plain_dir)
  plain = trunk_config(trunk_dir, student_trunk=False)   # the trunk may go unused
  assert 'image' in next(cached.make_iterator(plain, 0, 1))
  config = trunk_config(trunk_dir)
  config.student.adapter_blocks = 0
  with pytest.raises(ConfigError, match=r'student_trunk=True .* needs '
                                        r'config\.student\.adapter_blocks > 0'):
    config_lib.validate(config, jax.device_count())
  config = trunk_config(trunk_dir)
  config.teachers.dino.dtype = 'bfloat16'
  with pytest.raises(ConfigError, match=r"teachers\.dino\.dtype='bfloat16' differs from "
                                        r"config\.dtype='float32'"):
    cached.check_manifest(config, trunk_dir)
