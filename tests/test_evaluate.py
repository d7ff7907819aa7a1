"""Pinned evaluation protocols: the 'classification' evaluator (kNN at several k, linear probe
with its weight decay chosen on held-out train) and `python -m kivfm.evaluate` on a run's
student and on a teacher alone."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kivfm import config as config_lib, evaluate, metrics
from kivfm.data import offline
from kivfm.evals import classification

needs_fashion = pytest.mark.skipif(not os.path.isdir(offline.FASHION_MNIST_DIR),
                                   reason=f'needs {offline.FASHION_MNIST_PACKAGE}')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'configs/eval/fashion_mnist.py:tiny'


@pytest.fixture(scope='module')
def colours(tmp_path_factory):
  """A folder dataset of two classes told apart by colour (red / blue, 6 images each, random
  brightness), plus one corrupt file per class."""
  root = tmp_path_factory.mktemp('colours')
  rng = np.random.default_rng(0)
  for label, channel in (('0_red', 0), ('1_blue', 2)):
    (root / label).mkdir()
    for i in range(6):
      image = np.zeros((20, 24, 3), np.uint8)
      image[..., channel] = rng.integers(120, 255)
      Image.fromarray(image).save(root / label / f'{i}.png')
    (root / label / 'broken.png').write_bytes(b'not a png')
  return str(root)


class MeanColour:
  """A 'model' whose global feature is the mean colour and whose patches are the pixels."""

  @staticmethod
  def features(images):
    x = np.asarray(images, np.float32) / 255
    return {'cls': x.mean(axis=(1, 2)), 'patches': x[:, ::4, ::4]}


def classification_options(folder, **options):
  config = config_lib.defaults()
  config.evals.c = config_lib.evaluator(
      'classification', train=f'folder:{folder}', test=f'folder:{folder}', max_train=0,
      max_test=0, image_size=16, ks=(1, 3), **options)
  return config


def test_classification_of_separable_colours_is_perfect_and_counts_bad_files(colours):
  config = classification_options(colours)
  evaluator = classification.Classification(config.evals.c, config)
  results = evaluator.evaluate(MeanColour())
  assert results['images'] == {'train': 12, 'test': 12, 'size': 16,
                               'skipped': {'train': 2, 'test': 2}}
  assert results['knn'] == {'k1': 1.0, 'k3': 1.0}
  assert results['linear']['accuracy'] == 1.0
  assert 'kNN k3: 1.0000' in classification.table(results)


def test_the_probe_weight_decay_is_chosen_on_held_out_train_only(monkeypatch):
  """Scripted probe accuracies: the sweep scores held-out train rows (never test), picks the
  best weight decay (the first of equals), and the final probe uses it on all of train."""
  calls = []
  scripted = {1e-3: 0.5, 1e-2: 0.9, 1e-1: 0.9}

  def accuracy(train, train_y, test, test_y, *, weight_decay, **_):
    calls.append((len(train), len(test), weight_decay))
    return scripted[weight_decay] if len(test) == 2 else 0.77

  monkeypatch.setattr(classification.linear_probe, 'linear_probe_accuracy', accuracy)
  options = config_lib.evaluator('classification', weight_decays=(1e-3, 1e-2, 1e-1),
                                 holdout=0.2, seed=0)
  y = np.arange(10) % 2
  out = classification.probe(np.zeros((10, 3)), y, np.zeros((5, 3)), y[:5], options)
  assert calls == [(8, 2, 1e-3), (8, 2, 1e-2), (8, 2, 1e-1), (10, 5, 1e-2)]
  assert out == {'accuracy': 0.77, 'weight_decay': 1e-2,
                 'held_out_accuracy': {'0.001': 0.5, '0.01': 0.9, '0.1': 0.9}}
  fit, held = classification.holdout_split(y, 0.2, seed=0)
  assert sorted(np.concatenate([fit, held])) == list(range(10)) and len(held) == 2


@needs_fashion
def test_evaluate_a_run_and_a_teacher_with_a_protocol(tmp_path, monkeypatch):
  """The student of a (smoke) run and, through the command as a user types it, a teacher alone:
  DIR/eval/<protocol>[.teacher-<name>].json with the checkpoint step and every number."""
  from kivfm import train
  monkeypatch.chdir(REPO_ROOT)
  config = config_lib.load('configs/base.py:smoke')
  config.total_steps = 2
  config.progress = 'none'
  # The same evaluators run in training when the config names them (here every step).
  config.evals.classification = config_lib.evaluator('classification', every=1, max_train=40,
                                                     max_test=20, ks=(5,), weight_decays=(0.1,))
  train.train_and_evaluate(config, str(tmp_path))
  logged = metrics.read_jsonl(tmp_path / 'metrics.jsonl')
  assert all('eval/classification/knn/k5' in r for r in logged)
  assert json.loads((tmp_path / 'eval' / 'classification.json').read_text())['images'][
      'train'] == 40
  record = evaluate.run(config_lib.load(TINY), 'fashion_mnist', str(tmp_path))
  assert record['step'] == 2 and record['model'] == 'student'
  results = record['results']['classification']
  assert results['images']['train'] == 200 and results['images']['size'] == 98
  assert set(results['knn']) == {'k10', 'k20'}
  assert json.loads((tmp_path / 'eval' / 'fashion_mnist.json').read_text()) == record
  segmentation = evaluate.run(config_lib.load('configs/eval/pasted_segmentation.py:tiny'),
                              'pasted_segmentation', str(tmp_path))
  results = segmentation['results']['semantic_segmentation']
  assert results['images'] == {'train': 32, 'test': 16, 'size': 98, 'feature_grid': [4, 4]}
  assert 0 < results['miou'] <= 1 and 0 < results['pixel_accuracy'] <= 1

  result = subprocess.run(
      [sys.executable, '-m', 'kivfm.evaluate', f'--config={TINY}', f'--workdir={tmp_path}',
       '--model=teacher:tiny-dino', '--teacher_weights=random'],
      capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'classification (200 train / 100 test images at 98 px)' in result.stdout
  saved = json.loads((tmp_path / 'eval' / 'fashion_mnist.teacher-tiny-dino.json').read_text())
  assert saved['model'] == 'teacher:tiny-dino'
  assert 0 <= saved['results']['classification']['linear']['accuracy'] <= 1


def test_a_wrong_model_is_named(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="--model='dino': use student or teacher:"):
    evaluate.load_model('dino', str(tmp_path), None, 32, 'random')


# ------------------------------------------------------------------------ segmentation


@needs_fashion
def test_pasted_objects_are_deterministic_with_consistent_ground_truth():
  from kivfm.data import pasted
  source = pasted.PastedObjects(6, 'train', size=64)
  for i in range(len(source)):
    a, b = source[i], source[i]
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert a['image'].shape == (64, 64, 3) and a['label'].shape == (64, 64)
    assert len(a['classes']) == len(a['masks']) == len(a['boxes'])
    for cls, mask, box in zip(a['classes'], a['masks'], a['boxes']):
      assert 1 <= cls < pasted.NUM_CLASSES and mask.sum() >= pasted.MIN_PIXELS
      assert (a['label'][mask] == cls).all()
      y0, x0, y1, x1 = box.astype(int)
      assert mask[y0:y1, x0:x1].sum() == mask.sum()                 # the box holds the mask
      assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
    assert not (a['masks'].sum(axis=0) > 1).any()                   # occlusion: one owner
  assert not np.array_equal(source[0]['image'], pasted.PastedObjects(1, 'test', size=64)[0]['image'])
  boxes = pasted.mask_boxes(np.pad(np.ones((1, 2, 3), bool), ((0, 0), (1, 4), (5, 0))))
  np.testing.assert_array_equal(boxes, [[1, 5, 3, 8]])


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
  """ADE20K layout: images/ and annotations/; red squares (class 2 in the PNG), blue squares
  (class 3), black elsewhere (class 1) and a corner labelled 0 (ignored with reduce_zero_label)."""
  root = tmp_path_factory.mktemp('pairs')
  (root / 'images').mkdir()
  (root / 'annotations').mkdir()
  rng = np.random.default_rng(0)
  for i in range(8):
    image = np.zeros((24, 24, 3), np.uint8)
    label = np.ones((24, 24), np.uint8)
    for channel, cls in ((0, 2), (2, 3)):
      top, left = rng.integers(0, 16, size=2)
      image[top:top + 8, left:left + 8] = 0
      image[top:top + 8, left:left + 8, channel] = 255
      label[top:top + 8, left:left + 8] = cls
    label[:2, :2] = 0
    Image.fromarray(image).save(root / 'images' / f'{i}.png')
    Image.fromarray(label).save(root / 'annotations' / f'{i}.png')
  return str(root)


class Pixels:
  """A 'model' whose patch features are its pixels (a 24 x 24 grid of RGB)."""

  @staticmethod
  def features(images):
    x = np.asarray(images, np.float32) / 255
    return {'cls': x.mean(axis=(1, 2)), 'patches': x}


def test_a_linear_head_on_separable_pixels_segments_perfectly(pairs):
  from kivfm.evals import semantic
  config = config_lib.defaults()
  config.evals.s = config_lib.evaluator(
      'semantic_segmentation', train=f'pairs:{pairs}', test=f'pairs:{pairs}', max_train=0,
      max_test=0, image_size=24, num_classes=3, reduce_zero_label=True, steps=200, lr=0.1,
      batch_size=4)
  evaluator = semantic.SemanticSegmentation(config.evals.s, config)
  assert set(np.unique(evaluator.train[1])) == {0, 1, 2, 255}
  results = evaluator.evaluate(Pixels())
  assert results['miou'] == 1.0 and results['pixel_accuracy'] == 1.0
  assert results['per_class_iou'] == [1.0, 1.0, 1.0]
  with pytest.raises(config_lib.ConfigError, match="source 'ade20k': use pasted:SPLIT, coco:.* or pairs:ROOT"):
    semantic.labelled_maps('ade20k', 1, 24, config.data)
