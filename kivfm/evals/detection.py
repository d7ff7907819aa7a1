"""Object detection and instance segmentation on frozen patch features (evaluator 'detection').

Head (trained here, the backbone stays frozen): a simple feature pyramid from the last ViT map
(ViTDet-style: 1x1 reduction, then two stride-2 transposed convolutions to 2x and 4x the patch
grid), fused top-down at 4x; on it an anchor-free CenterNet-style box head (per-class centre
heatmap with focal loss, centre offset and box size with L1) and a YOLACT-style mask head
(`prototypes` mask prototypes, per-centre coefficients, binary cross-entropy inside the box).
Inference: heatmap peaks (3 x 3 local maxima), the best `max_detections`, boxes from offset and
size, masks = the prototypes' combination upsampled to the image, cut to the box, > 0.5.
Scored with COCO box and mask AP (`kivfm.evals.coco`, equal to pycocotools) on the sources of
`kivfm.data.instances` ('pasted:SPLIT', 'coco:ANNOTATIONS.json:IMAGE_DIR').
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kivfm.data import instances
from kivfm.evals import coco
from kivfm.evals.frozen import TrainTest, standardized_patches

UPSAMPLE = 4     # the head's grid: 4x the patch grid


class Head(nnx.Module):
  def __init__(self, dim: int, num_classes: int, *, width: int, prototypes: int,
               rngs: nnx.Rngs):
    conv = functools.partial(nnx.Conv, rngs=rngs)
    self.reduce = conv(dim, width, (1, 1))
    self.up2 = nnx.ConvTranspose(width, width, (2, 2), strides=(2, 2), rngs=rngs)
    self.up4 = nnx.ConvTranspose(width, width, (2, 2), strides=(2, 2), rngs=rngs)
    self.fuse = conv(width, width, (3, 3))
    # Centre heatmap starts near 0.1 everywhere (CenterNet's prior), so early losses are sane.
    self.heatmap = conv(width, num_classes, (3, 3), bias_init=nnx.initializers.constant(-2.19))
    self.box = conv(width, 4, (3, 3))            # centre offset (2) and size (2), grid units
    self.coefficients = conv(width, prototypes, (3, 3))
    self.prototypes = conv(width, prototypes, (3, 3))

  def __call__(self, features):
    p1 = jax.nn.gelu(self.reduce(features))
    p2 = jax.nn.gelu(self.up2(p1))
    p4 = jax.nn.gelu(self.up4(p2))
    size = lambda x: jax.image.resize(x, p4.shape, 'bilinear')
    x = jax.nn.gelu(self.fuse(p4 + size(p2) + size(p1)))
    return {'heatmap': self.heatmap(x), 'box': self.box(x),
            'coefficients': self.coefficients(x), 'prototypes': self.prototypes(x)}


# ------------------------------------------------------------------------------------ targets

def targets(records: list[dict], grid: int, num_classes: int, max_objects: int) -> dict:
  """Training targets at a grid x grid head of instance `records` (`kivfm.data.instances`):
  centre heatmaps, centre cells, offsets and sizes (grid units), masks at the grid and, for the
  mask loss, the cells whose centre lies in the box grown by one cell."""
  n, size = len(records), records[0]['label'].shape[0]
  stride = size / grid
  heat = np.zeros((n, grid, grid, num_classes), np.float32)
  index = np.zeros((n, max_objects), np.int32)
  box = np.zeros((n, max_objects, 4), np.float32)
  valid = np.zeros((n, max_objects), np.float32)
  masks = np.zeros((n, max_objects, grid, grid), np.float32)
  inside = np.zeros((n, max_objects, grid, grid), np.float32)
  yy, xx = np.mgrid[:grid, :grid] + 0.5
  for i, record in enumerate(records):
    for k, (b, cls, mask) in enumerate(zip(record['boxes'][:max_objects],
                                           record['classes'][:max_objects],
                                           record['masks'][:max_objects])):
      y0, x0, y1, x1 = b / stride
      cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
      cell = (min(int(cy), grid - 1), min(int(cx), grid - 1))
      sigma = max((y1 - y0 + x1 - x0) / 12, 0.5)
      blob = np.exp(-((yy - 0.5 - cell[0]) ** 2 + (xx - 0.5 - cell[1]) ** 2) / (2 * sigma ** 2))
      heat[i, ..., cls - 1] = np.maximum(heat[i, ..., cls - 1], blob)
      index[i, k] = cell[0] * grid + cell[1]
      box[i, k] = cy - cell[0], cx - cell[1], y1 - y0, x1 - x0
      valid[i, k] = 1
      masks[i, k] = _area_resize(mask, grid)
      inside[i, k] = (yy >= y0) & (yy <= y1 + 1) & (xx >= x0) & (xx <= x1 + 1)
  return {'heatmap': heat, 'index': index, 'box': box, 'valid': valid, 'masks': masks,
          'inside': inside}


def _area_resize(mask: np.ndarray, grid: int) -> np.ndarray:
  """Fraction of each of grid x grid cells that the square `mask` covers."""
  edges = np.linspace(0, mask.shape[0], grid + 1).round().astype(int)
  sums = np.add.reduceat(np.add.reduceat(mask.astype(np.float32), edges[:-1], axis=0),
                         edges[:-1], axis=1)
  sides = np.diff(edges).astype(np.float32)
  return sums / np.outer(sides, sides)


# --------------------------------------------------------------------------------- training

def _gather(x, index):
  """x [B, G, G, C] at flat cells index [B, M] -> [B, M, C]."""
  flat = x.reshape(x.shape[0], -1, x.shape[-1])
  return jnp.take_along_axis(flat, index[..., None], axis=1)


def loss_fn(head, features, t):
  out = head(features)
  p = jnp.clip(jax.nn.sigmoid(out['heatmap']), 1e-4, 1 - 1e-4)
  peak = t['heatmap'] == 1
  focal = jnp.where(peak, (1 - p) ** 2 * jnp.log(p),
                    (1 - t['heatmap']) ** 4 * p ** 2 * jnp.log(1 - p))
  count = jnp.maximum(t['valid'].sum(), 1)
  heat_loss = -focal.sum() / count
  box_loss = (jnp.abs(_gather(out['box'], t['index']) - t['box']).sum(-1) * t['valid']).sum()
  coef = _gather(out['coefficients'], t['index'])                       # [B, M, K]
  logits = jnp.einsum('bmk,bhwk->bmhw', coef, out['prototypes'])
  bce = optax.sigmoid_binary_cross_entropy(logits, t['masks']) * t['inside']
  mask_loss = (bce.sum((-2, -1)) / jnp.maximum(t['inside'].sum((-2, -1)), 1) * t['valid']).sum()
  return heat_loss + 0.1 * box_loss / count + mask_loss / count


@nnx.jit
def _train_step(head, optimizer, features, t):
  loss, grads = nnx.value_and_grad(loss_fn)(head, features, t)
  optimizer.update(head, grads)
  return loss


def fit(features: np.ndarray, t: dict, num_classes: int, options) -> tuple[Head, float]:
  head = Head(features.shape[-1], num_classes, width=options.width,
              prototypes=options.prototypes, rngs=nnx.Rngs(options.seed))
  optimizer = nnx.Optimizer(head, optax.adamw(options.lr, weight_decay=options.weight_decay),
                            wrt=nnx.Param)
  rng = np.random.default_rng(options.seed)
  batch = min(options.batch_size, len(features))
  loss = float('nan')
  for _ in range(options.steps):
    pick = rng.choice(len(features), batch, replace=False)
    loss = _train_step(head, optimizer, features[pick], {k: v[pick] for k, v in t.items()})
  return head, float(loss)


# -------------------------------------------------------------------------------- inference

@functools.partial(nnx.jit, static_argnames=('top', 'size'))
def _detect(head, features, *, top: int, size: int):
  return decode(head(features), top=top, size=size)


def decode(out: dict, *, top: int, size: int):
  """Head outputs -> (boxes [B, top, 4] (y0, x0, y1, x1) px, scores [B, top], classes (1 +
  heatmap channel) [B, top], masks bool [B, top, size, size])."""
  heat = jax.nn.sigmoid(out['heatmap'])
  b, grid, _, classes = heat.shape
  peaks = heat == jax.lax.reduce_window(heat, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                                        (1, 1, 1, 1), 'SAME')
  scores, flat = jax.lax.top_k(jnp.where(peaks, heat, 0).reshape(b, -1), top)
  cell, cls = flat // classes, flat % classes
  box = _gather(out['box'], cell)
  stride = size / grid
  centre = jnp.stack([cell // grid, cell % grid], -1) + box[..., :2]
  half = jnp.abs(box[..., 2:]) / 2
  boxes = jnp.clip(jnp.concatenate([centre - half, centre + half], -1) * stride, 0, size)
  coef = _gather(out['coefficients'], cell)
  masks = jax.nn.sigmoid(jnp.einsum('bmk,bhwk->bmhw', coef, out['prototypes']))
  masks = jax.image.resize(masks, (b, top, size, size), 'bilinear')
  ys = jnp.arange(size)[:, None] + 0.5
  xs = jnp.arange(size)[None, :] + 0.5
  in_box = ((ys >= boxes[..., 0, None, None]) & (ys <= boxes[..., 2, None, None]) &
            (xs >= boxes[..., 1, None, None]) & (xs <= boxes[..., 3, None, None]))
  return boxes, scores, cls + 1, (masks > 0.5) & in_box


def detect(head, features: np.ndarray, size: int, options) -> list[dict]:
  out = []
  for start in range(0, len(features), options.batch_size):
    boxes, scores, classes, masks = jax.device_get(_detect(
        head, features[start:start + options.batch_size], top=options.max_detections,
        size=size))
    out.extend({'boxes': b, 'scores': s, 'classes': c, 'masks': m}
               for b, s, c, m in zip(boxes, scores, classes, masks))
  return out


class Detection(TrainTest):
  """COCO box and mask AP of a detection head on frozen features (see the module docstring)."""

  DEFAULTS = dict(
      train='pasted:train',
      test='pasted:test',
      max_train=400,
      max_test=100,
      image_size=0,                   # 0: the view size
      width=128,                      # channels of the pyramid and heads
      prototypes=8,
      max_objects=8,                  # ground-truth objects per image used for training
      steps=400,
      lr=2e-3,
      weight_decay=1e-4,
      batch_size=16,
      max_detections=100,
      seed=0,
  )

  def _read(self, spec, limit, size, data) -> list[dict]:
    records, self.num_classes = instances.open_instances(spec, limit, size, data)
    return records

  def evaluate(self, model) -> dict:
    o = self.options
    pixels = lambda records: np.stack([r['image'] for r in records])
    train_f, test_f = standardized_patches(model, pixels(self.train), pixels(self.test),
                                           o.batch_size)
    grid = train_f.shape[1] * UPSAMPLE
    t = targets(self.train, grid, self.num_classes, o.max_objects)
    head, loss = fit(train_f, t, self.num_classes, o)
    size = self.test[0]['label'].shape[0]
    detections = detect(head, test_f, size, o)
    truth = [{k: r[k] for k in ('boxes', 'masks', 'classes')} for r in self.test]
    return {'images': {'train': len(self.train), 'test': len(self.test), 'size': size,
                       'head_grid': [grid, grid]},
            'box': coco.evaluate(detections, truth, kind='box', max_detections=o.max_detections),
            'mask': coco.evaluate(detections, truth, kind='mask',
                                  max_detections=o.max_detections),
            'final_train_loss': loss}

  def write(self, results: dict, workdir: str) -> None:
    del workdir
    i = results['images']
    print(f'detection ({i["train"]} train / {i["test"]} test images at {i["size"]} px, head '
          f'grid {i["head_grid"]}):', flush=True)
    for kind in ('box', 'mask'):
      print(f'  {kind} ' + ', '.join(f'{k} {v:.4f}' for k, v in results[kind].items()),
            flush=True)
