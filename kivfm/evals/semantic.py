"""Semantic segmentation with a linear head on frozen patch features (evaluator
'semantic_segmentation'; the DINOv2 linear protocol).

Patch features [h, w, D] of each image, standardised with train statistics, go through one
linear layer to class logits, which are bilinearly upsampled to the label resolution; the layer
is trained with AdamW on the pixel cross-entropy (pixels labelled `ignore_index` excluded) for
`steps` minibatch steps, and scored by mean IoU on the test images.
Sources: 'pasted:SPLIT' (`kivfm.data.pasted`, generated at `image_size`, exact ground truth),
'coco:ANNOTATIONS.json:IMAGE_DIR' (instance masks painted into a label map; `kivfm.data.instances`)
or 'pairs:ROOT' (ADE20K layout: ROOT/images/NAME.{jpg,png} with ROOT/annotations/NAME.png; with
`reduce_zero_label` label 0 is ignored and the others shift down by one, as for ADE20K).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from kivfm.data import images, instances
from kivfm.errors import ConfigError
from kivfm.evals import segmentation
from kivfm.evals.frozen import TrainTest, standardized_patches


def _pairs(root: str, limit: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  names = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(root, 'annotations'))
                 if f.endswith('.png'))[:limit or None]
  pixels, labels = [], []
  for name in names:
    image = next((os.path.join(root, 'images', name + ext) for ext in ('.jpg', '.png')
                  if os.path.exists(os.path.join(root, 'images', name + ext))), None)
    if image is None:
      raise FileNotFoundError(f'{root}/annotations/{name}.png has no image in {root}/images')
    with open(image, 'rb') as f:
      pixels.append(images.center_square(images.decode(f.read(), image), size))
    label = np.asarray(Image.open(os.path.join(root, 'annotations', name + '.png')))
    side = min(label.shape)
    top, left = (label.shape[0] - side) // 2, (label.shape[1] - side) // 2
    crop = Image.fromarray(label[top:top + side, left:left + side])
    labels.append(np.asarray(crop.resize((size, size), Image.NEAREST)))
  return np.stack(pixels), np.stack(labels).astype(np.int32)


def labelled_maps(spec: str, limit: int, size: int, data):
  """(uint8 images [N, S, S, 3], int32 label maps [N, S, S], classes incl. background or None
  when the source does not say) of source `spec`."""
  kind, _, argument = spec.partition(':')
  if kind == 'pairs' and argument:
    return (*_pairs(argument, limit, size), None)
  if kind not in ('pasted', 'coco'):
    raise ConfigError(f'segmentation source {spec!r}: use pasted:SPLIT, '
                      f'coco:ANNOTATIONS.json:IMAGE_DIR or pairs:ROOT')
  records, objects = instances.open_instances(spec, limit, size, data)
  return (np.stack([r['image'] for r in records]), np.stack([r['label'] for r in records]),
          1 + objects)


def _logits(params, feats, size: int):
  logits = feats @ params['w'] + params['b']
  return jax.image.resize(logits, (*logits.shape[:-3], size, size, logits.shape[-1]), 'bilinear')


@functools.partial(jax.jit, static_argnames=('size', 'ignore_index', 'tx'))
def _train_step(params, opt_state, feats, labels, *, size, ignore_index, tx):
  def loss_fn(p):
    logits = _logits(p, feats, size)
    valid = labels != ignore_index
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def fit_linear_head(feats, labels, num_classes: int, options) -> tuple[dict, float]:
  """Trains the linear head on feats [N, h, w, D] -> labels [N, S, S]; (params, last loss)."""
  rng = np.random.default_rng(options.seed)
  params = {'w': jnp.zeros((feats.shape[-1], num_classes)), 'b': jnp.zeros((num_classes,))}
  tx = optax.adamw(options.lr, weight_decay=options.weight_decay)
  opt_state = tx.init(params)
  batch = min(options.batch_size, len(feats))
  loss = float('nan')
  for _ in range(options.steps):
    pick = rng.choice(len(feats), batch, replace=False)
    params, opt_state, loss = _train_step(params, opt_state, feats[pick], labels[pick],
                                          size=labels.shape[-1],
                                          ignore_index=options.ignore_index, tx=tx)
  return params, float(loss)


def predict(params, feats, size: int, batch: int) -> np.ndarray:
  predict_fn = jax.jit(lambda f: jnp.argmax(_logits(params, f, size), axis=-1))
  return np.concatenate([np.asarray(predict_fn(feats[i:i + batch]))
                         for i in range(0, len(feats), batch)])


class SemanticSegmentation(TrainTest):
  """mIoU of a linear head on frozen patch features (see the module docstring)."""

  DEFAULTS = dict(
      train='pasted:train',           # source spec of the training images and label maps
      test='pasted:test',
      max_train=300,                  # images (0: all of a folder or file; 500 of 'pasted')
      max_test=100,
      image_size=0,                   # side of images and label maps (0: the view size)
      num_classes=0,                  # 0: from the source (pasted, coco: 1 + object classes)
      ignore_index=255,
      reduce_zero_label=False,        # ADE20K: 0 -> ignore_index, the rest minus 1
      steps=300,
      lr=1e-3,
      weight_decay=1e-4,
      seed=0,
      batch_size=32,
  )

  def _read(self, spec, limit, size, data):
    pixels, labels, classes = labelled_maps(spec, limit, size, data)
    if self.options.reduce_zero_label:
      labels = np.where(labels == 0, self.options.ignore_index, labels - 1)
    self.num_classes = self.options.num_classes or classes
    if not self.num_classes:
      raise ConfigError(f'segmentation source {spec!r} does not name its classes: set the '
                        f'evaluator option num_classes')
    return pixels, labels

  def evaluate(self, model) -> dict:
    o = self.options
    (train_x, train_y), (test_x, test_y) = self.train, self.test
    train_f, test_f = standardized_patches(model, train_x, test_x, o.batch_size)
    params, loss = fit_linear_head(train_f, train_y, self.num_classes, o)
    pred = predict(params, test_f, test_y.shape[-1], o.batch_size)
    miou, per_class = segmentation.mean_iou(pred, test_y, self.num_classes, o.ignore_index,
                                            return_per_class=True)
    return {'images': {'train': len(train_x), 'test': len(test_x), 'size': int(test_y.shape[-1]),
                       'feature_grid': list(train_f.shape[1:3])},
            'miou': miou, 'pixel_accuracy': pixel_accuracy(pred, test_y, o.ignore_index),
            'per_class_iou': [None if np.isnan(v) else float(v) for v in per_class],
            'final_train_loss': loss}

  def write(self, results: dict, workdir: str) -> None:
    del workdir
    print(f'semantic segmentation ({results["images"]["train"]} train / '
          f'{results["images"]["test"]} test images at {results["images"]["size"]} px, '
          f'features {results["images"]["feature_grid"]}): mIoU {results["miou"]:.4f}, '
          f'pixel accuracy {results["pixel_accuracy"]:.4f}', flush=True)


def pixel_accuracy(pred, labels, ignore_index: int) -> float:
  valid = labels != ignore_index
  return float((pred == labels)[valid].mean()) if valid.any() else float('nan')
