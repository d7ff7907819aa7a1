"""Pasted objects: an offline segmentation / detection dataset with exact ground truth, made of
real images available here.

Example i of a split is generated from the seed (seed, split, i), so it needs no preparation and
is the same on every machine: a random square crop of one of the offline photographs
(scikit-image / scikit-learn; `offline.load_photos`) resized to `size` as the background, with
1 to `max_objects` Fashion-MNIST items of that split pasted at random positions and sizes, each
in a random colour. An item's mask is its pixels above `FOREGROUND` (of 255); later items occlude
earlier ones, whose masks lose the covered pixels; an item left with fewer than `MIN_PIXELS`
pixels is dropped from the ground truth (its visible pixels stay in the image, labelled as its
class in the semantic map).

A record: {'image': uint8 [S, S, 3], 'label': int32 [S, S] semantic map (0 background, 1 + the
Fashion-MNIST class), 'boxes': float32 [K, 4] (y0, x0, y1, x1) pixel corners of each mask,
'classes': int32 [K] (1 + class), 'masks': bool [K, S, S]}.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from kivfm.data import offline

FOREGROUND = 40
MIN_PIXELS = 16
NUM_CLASSES = 1 + len(offline.FASHION_MNIST_CLASSES)   # background + the 10 item classes
SPLITS = ('train', 'test')


@functools.lru_cache(maxsize=None)
def _photos() -> tuple[np.ndarray, ...]:
  return tuple(image for _, image in offline.load_photos())


@functools.lru_cache(maxsize=4)
def _items(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  return offline.read_fashion_mnist(directory, split)


class PastedObjects:
  """Random-access source of `num_examples` generated records (see the module docstring)."""

  def __init__(self, num_examples: int, split: str = 'train', *, size: int = 128,
               max_objects: int = 3, seed: int = 0,
               fashion_mnist_dir: str = offline.FASHION_MNIST_DIR):
    if split not in SPLITS:
      raise ValueError(f'pasted objects: split {split!r} is not one of {SPLITS}')
    self.num_examples, self.split, self.size = num_examples, split, size
    self.max_objects, self.seed, self.directory = max_objects, seed, fashion_mnist_dir

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'pasted objects: index {index} outside [0, {self.num_examples})')
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
    image = self._background(rng)
    items, item_classes = _items(self.directory, self.split)
    owner = np.full((self.size, self.size), -1, np.int32)   # which pasted item shows where
    classes = []
    for k in range(rng.integers(1, self.max_objects + 1)):
      pick = rng.integers(len(items))
      side = int(rng.integers(self.size // 4, self.size // 2 + 1))
      item = np.asarray(Image.fromarray(items[pick]).resize((side, side), Image.BILINEAR))
      top, left = rng.integers(0, self.size - side + 1, size=2)
      alpha = item.astype(np.float32) / 255
      colour = rng.integers(60, 256, size=3).astype(np.float32)
      window = (slice(top, top + side), slice(left, left + side))
      image[window] = (image[window] * (1 - alpha[..., None]) +
                       colour * alpha[..., None]).astype(np.uint8)
      owner[window] = np.where(item > FOREGROUND, k, owner[window])
      classes.append(1 + int(item_classes[pick]))
    label = np.where(owner >= 0, np.asarray(classes)[np.maximum(owner, 0)], 0).astype(np.int32)
    masks, kept = [], []
    for k, cls in enumerate(classes):
      mask = owner == k
      if mask.sum() >= MIN_PIXELS:
        masks.append(mask)
        kept.append(cls)
    masks = np.stack(masks) if masks else np.zeros((0, self.size, self.size), bool)
    return {'image': image, 'label': label, 'boxes': mask_boxes(masks),
            'classes': np.asarray(kept, np.int32), 'masks': masks}

  def _background(self, rng: np.random.Generator) -> np.ndarray:
    photo = _photos()[rng.integers(len(_photos()))]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side]).convert('RGB')
    return np.array(crop.resize((self.size, self.size), Image.BILINEAR))


def mask_boxes(masks: np.ndarray) -> np.ndarray:
  """float32 [K, 4] (y0, x0, y1, x1) tight pixel-corner boxes of bool masks [K, H, W]."""
  boxes = np.zeros((len(masks), 4), np.float32)
  for k, mask in enumerate(masks):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    boxes[k] = rows[0], cols[0], rows[-1] + 1, cols[-1] + 1
  return boxes
