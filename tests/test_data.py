"""The grain pipeline over real offline images, image folders with bad files, TFDS sources,
mixtures, sharding, determinism and exact resume."""
import io
import os
import re

import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from kivfm import config as config_lib
from kivfm.data import offline, pipeline, sources

FASHION = offline.FASHION_MNIST_DIR
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION),
                                   reason=f'needs {offline.FASHION_MNIST_PACKAGE}')


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def data_config(tfds_dir, **data):
  config = config_lib.defaults()
  config.data.update(image_size=32, batch_size=8, tfds_data_dir=tfds_dir, max_examples=512)
  config.data.update(**data)
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def png(image, mode=None):
  buffer = io.BytesIO()
  Image.fromarray(image).convert(mode or Image.fromarray(image).mode).save(buffer, 'PNG')
  return buffer.getvalue()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """Two classes; 6 good images (RGB JPEG, grey PNG, RGBA PNG, palette GIF, ...), 3 bad
  (random bytes, a truncated PNG, text named .jpg) and a non-image file that is not listed."""
  root = tmp_path_factory.mktemp('images')
  cats, things = root / 'cats', root / 'things'
  (cats / 'nested').mkdir(parents=True)
  things.mkdir()
  Image.fromarray(skimage.data.chelsea()).save(cats / 'chelsea.jpg', quality=90)
  (cats / 'nested' / 'rgba.png').write_bytes(png(skimage.data.chelsea()[::4, ::4], 'RGBA'))
  (things / 'grey.png').write_bytes(png(skimage.data.camera()[::8, ::8]))
  Image.fromarray(skimage.data.coffee()[::4, ::4]).convert('P').save(things / 'palette.gif')
  Image.fromarray(skimage.data.rocket()[::4, ::4]).save(things / 'rocket.webp')
  Image.fromarray(skimage.data.astronaut()[::8, ::8]).save(things / 'astronaut.bmp')
  (cats / 'corrupt.jpg').write_bytes(np.random.default_rng(0).bytes(3000))
  (things / 'truncated.png').write_bytes(png(skimage.data.coffee())[:5000])
  (things / 'fake.jpg').write_text('not an image')
  (things / 'notes.txt').write_text('ignored: not an image extension')
  return str(root)


# --------------------------------------------------------------------------------------------
# Offline Fashion-MNIST through the whole pipeline.
# --------------------------------------------------------------------------------------------

@needs_fashion
def test_fashion_mnist_batches_are_rgb_views_with_labels(tfds_dir):
  batch = next(pipeline.make_iterator(data_config(tfds_dir, source='fashion_mnist'), 0, 1))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
  for key in ('label', 'index', 'source'):
    assert batch[key].shape == (8,) and batch[key].dtype == np.int32
  assert batch['skipped'] == 0 and isinstance(batch['skipped'], int)
  image = batch['image'].astype(int)
  assert image.max() > 100 and image.min() == 0  # real garments on a black background
  assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
  assert set(batch['label']) <= set(range(10))

  # Labels are kept: every stored record is a Debian example with its label.
  debian_images, debian_labels = offline.read_fashion_mnist(FASHION, 'train')
  by_bytes = {debian_images[i].tobytes(): debian_labels[i] for i in range(512)}
  source = offline.builder('fashion_mnist', tfds_dir, max_examples=512).as_data_source('train')
  assert len(source) == 512
  for i in batch['index']:
    record = source[int(i)]
    assert record['image'].shape == (28, 28, 1)
    assert by_bytes[record['image'].tobytes()] == record['label']
  assert [source[int(i)]['label'] for i in batch['index']] == list(batch['label'])


@needs_fashion
def test_processes_read_their_blocks_of_the_single_process_batches(tfds_dir):
  """Two processes' batches, side by side, are the one-process batches (same views): a run's
  data does not depend on its number of processes; over an epoch they see disjoint examples."""
  config = data_config(tfds_dir, source='fashion_mnist')
  single = take(pipeline.make_iterator(config, 0, 1), 64)   # one epoch of 512
  parts = [take(pipeline.make_iterator(config, process, 2), 64) for process in range(2)]
  for whole, first, second in zip(single, *parts):
    assert first['image'].shape == (4, 32, 32, 3)
    for key in ('image', 'index', 'label'):
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
  seen = [np.concatenate([b['index'] for b in batches]) for batches in parts]
  assert sorted(np.concatenate(seen)) == list(range(512))


@needs_fashion
def test_same_seed_same_batches_and_exact_resume(tfds_dir):
  config = data_config(tfds_dir, source='fashion_mnist')
  a, b = pipeline.make_iterator(config, 0, 1), pipeline.make_iterator(config, 0, 1)
  first = take(a, 3)
  for x, y in zip(first, take(b, 3)):
    assert_same(x, y)
  state = a.get_state()
  expected = take(a, 2)
  resumed = pipeline.make_iterator(config, 0, 1)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 2)):
    assert_same(x, y)
  config.data.shuffle_seed = 1
  other = next(pipeline.make_iterator(config, 0, 1))
  assert not np.array_equal(other['index'], first[0]['index'])


# --------------------------------------------------------------------------------------------
# Bad data.
# --------------------------------------------------------------------------------------------

def test_folder_skips_and_counts_bad_files_and_resumes(folder, tmp_path):
  config = data_config(str(tmp_path), source='folder', folder=folder, batch_size=4)
  source = sources.FolderSource(folder)
  assert source.classes == ['cats', 'things'] and len(source) == 9   # notes.txt is not listed
  bad = {i for i, p in enumerate(source.paths) if os.path.basename(p) in
         ('corrupt.jpg', 'truncated.png', 'fake.jpg')}
  iterator = pipeline.make_iterator(config, 0, 1)
  batches = take(iterator, 10)
  consumed = iterator.get_state()['next_index']
  skipped = sum(b['skipped'] for b in batches)
  assert consumed == 40 + skipped
  assert 3 * (consumed // 9) <= skipped <= 3 * -(-consumed // 9)   # 3 bad files per epoch
  for b in batches:
    assert b['image'].shape == (4, 32, 32, 3)
    assert not bad & set(b['index'].tolist())
    assert [source.labels[i] for i in b['index']] == list(b['label'])

  # Resume in the middle of a stream with bad records: the same batches and skip counts.
  again = pipeline.make_iterator(config, 0, 1)
  take(again, 4)
  resumed = pipeline.make_iterator(config, 0, 1)
  resumed.set_state(again.get_state())
  for x, y in zip(batches[4:], take(resumed, 6)):
    assert_same(x, y)


class ListSource(list):
  """An in-memory source (anything with len and getitem works)."""


def test_wrong_dtype_shape_and_unreadable_records_are_skipped(tmp_path):
  good = np.zeros((6, 5, 3), np.uint8)
  records = ListSource([
      {'image': good}, {'image': good.astype(np.float32)}, {'image': np.zeros(5, np.uint8)},
      {'image': np.zeros((4, 4, 2), np.uint8)}, {'image': b'garbage'}, {'label': 3},
      {'image': np.zeros((0, 4, 3), np.uint8)}, {'image': good[..., :1], 'label': 7},
      {'image': np.zeros((3, 3, 4), np.uint8)}, None])
  data = data_config(str(tmp_path), batch_size=3, max_examples=0).data
  iterator = iter(pipeline.make_dataset([(records, 1.0, 'list')], data))
  batches = take(iterator, 4)
  assert all(set(b['index'].tolist()) <= {0, 7, 8} for b in batches)
  skipped = sum(b['skipped'] for b in batches)
  assert skipped == iterator.get_state()['next_index'] - 12
  assert 7 * 3 <= skipped <= 7 * 4   # 12 good = 4 epochs of 3 good and 7 bad records


def test_a_source_of_only_bad_records_stops_with_the_reason(tmp_path):
  root = tmp_path / 'broken' / 'class'
  root.mkdir(parents=True)
  (root / 'a.jpg').write_text('not an image')
  config = data_config(str(tmp_path), source='folder', folder=str(tmp_path / 'broken'))
  with pytest.raises(RuntimeError, match=r'bad records in a row.*a\.jpg'):
    next(pipeline.make_iterator(config, 0, 1))


# --------------------------------------------------------------------------------------------
# TFDS sources and missing data.
# --------------------------------------------------------------------------------------------

class KivfmTestJpegs(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset like imagenet2012: JPEG-encoded `features.Image` + label, one corrupt."""
  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # see kivfm.data.offline

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(24):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), np.uint8)).save(buffer, 'JPEG')
      yield i, {'image': buffer.getvalue()[:300] if i == 5 else buffer.getvalue(),
                'label': i % 3}


def test_tfds_source_reads_encoded_images_and_skips_corrupt_ones(tmp_path):
  KivfmTestJpegs(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  config = data_config(str(tmp_path), source='tfds', tfds_name='kivfm_test_jpegs',
                       batch_size=4)
  iterator = pipeline.make_iterator(config, 0, 1)
  batches = take(iterator, 12)   # two epochs
  assert all(b['image'].shape == (4, 32, 32, 3) for b in batches)
  assert 1 <= sum(b['skipped'] for b in batches) <= 3
  assert sum(b['skipped'] for b in batches) + 48 == iterator.get_state()['next_index']


def test_unprepared_tfds_dataset_fails_at_start_with_the_command(tmp_path):
  config = data_config(str(tmp_path), source='tfds', tfds_name='imagenet2012')
  with pytest.raises(sources.DataUnavailableError,
                     match=re.escape(f'tfds build imagenet2012 --data_dir={tmp_path} '
                                     f'--file_format=array_record --manual_dir=')):
    pipeline.make_iterator(config, 0, 1)
  config.data.tfds_name = 'no_such_dataset_kivfm'
  with pytest.raises(sources.DataUnavailableError, match='tfds build no_such_dataset_kivfm'):
    pipeline.make_iterator(config, 0, 1)


def test_offline_builder_without_its_files_names_the_package(tmp_path):
  (tmp_path / 'empty').mkdir()
  config = data_config(str(tmp_path / 'tfds'), source='fashion_mnist',
                       fashion_mnist_dir=str(tmp_path / 'empty'))
  with pytest.raises(offline.SourceMissingError, match='apt-get install -y dataset-fashion-mnist'):
    pipeline.make_iterator(config, 0, 1)
  config.data.prepare_offline = False
  with pytest.raises(sources.DataUnavailableError,
                     match=re.escape(f'python -m kivfm.data.offline --data_dir={tmp_path}/tfds '
                                     f'--kinds=fashion_mnist --max_examples=512')):
    pipeline.make_iterator(config, 0, 1)


def test_config_validation_names_the_key():
  data = config_lib.defaults().data
  data.source = 'imagenet'
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.source='imagenet'.*folder"):
    sources.validate(data)
  data.source = 'mixture'
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.mixture'):
    sources.validate(data)
  data.mixture = (('tfds:imagenet2012', 0.7), ('hub:x', 0.3))
  with pytest.raises(config_lib.ConfigError, match=r"spec 'hub:x'.*folder:PATH"):
    sources.validate(data)
  data.mixture = (('tfds:imagenet2012:train[:10%]', 0.7), ('folder:/x', 0.3))
  sources.validate(data)
  assert sources.components(data) == [('tfds:imagenet2012:train[:10%]', 0.7), ('folder:/x', 0.3)]


# --------------------------------------------------------------------------------------------
# Mixtures, photos, worker processes.
# --------------------------------------------------------------------------------------------

def test_mixture_weights_are_respected_and_deterministic(tmp_path, folder):
  config = data_config(str(tmp_path), source='mixture', batch_size=16,
                       mixture=(('synthetic', 0.8), (f'folder:{folder}', 0.2)))
  batches = take(pipeline.make_iterator(config, 0, 1), 25)
  origin = np.concatenate([b['source'] for b in batches])
  # 20% of the draws are folder records, a third of which are bad and dropped.
  draws = len(origin) + sum(b['skipped'] for b in batches)
  assert abs(np.sum(origin == 0) / draws - 0.8) < 0.03
  for x, y in zip(batches, take(pipeline.make_iterator(config, 0, 1), 25)):
    assert_same(x, y)


def test_photos_are_real_rgb_images(tmp_path):
  config = data_config(str(tmp_path), source='photos', batch_size=17)
  batch = next(pipeline.make_iterator(config, 0, 1))
  assert sorted(batch['index']) == list(range(17)) and (batch['label'] == -1).all()
  assert batch['image'].shape == (17, 32, 32, 3) and batch['image'].std() > 20


def test_worker_processes_resume_exactly_with_bad_records(folder, tmp_path):
  config = data_config(str(tmp_path), source='folder', folder=folder, batch_size=4,
                       worker_count=1)
  iterator = pipeline.make_iterator(config, 0, 1)
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 4)
  resumed = pipeline.make_iterator(config, 0, 1)
  resumed.set_state(state)
  for x, y in zip(expected, take(resumed, 4)):
    assert_same(x, y)
  assert sum(b['skipped'] for b in expected) > 0
  iterator.close()
  resumed.close()


def test_auto_workers_follow_the_host_cores():
  assert [pipeline.auto_workers(c) for c in (1, 2, 4, 8, 96, 240)] == [0, 0, 0, 4, 32, 32]


def test_worker_count_below_auto_is_a_config_error(tmp_path):
  config = data_config(str(tmp_path), worker_count=-2)
  with pytest.raises(config_lib.ConfigError, match="data.worker_count=-2"):
    sources.validate(config.data)
