"""Per-example augmentation: ONE random-resized crop + horizontal flip, uint8 in and out.

`crop_and_flip` = `sample_view` (the random box and flip) + `apply_view` (the pixels), so a view
recorded as (box, flip), e.g. in a teacher-target cache (`kivfm.cache`), is rebuilt exactly."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a crop with random area fraction and aspect ratio (Inception-style);
  falls back to the largest centred crop of an allowed ratio."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def sample_view(height: int, width: int, rng: np.random.Generator, scale=(0.35, 1.0)
                ) -> tuple[tuple[int, int, int, int], bool]:
  """The random choices of one view of an [height, width] image: (crop box (top, left, h, w),
  horizontal flip). Draws from `rng` in the order `crop_and_flip` always has."""
  box = random_resized_crop_box(height, width, rng, scale)
  return box, bool(rng.random() < 0.5)


def apply_view(image: np.ndarray, size: int, box, flip: bool) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: crop `box` = (top, left, h, w), resize
  (bilinear), flip horizontally if `flip`. Deterministic: a recorded view rebuilds exactly."""
  top, left, h, w = (int(v) for v in box)
  crop = Image.fromarray(image[top:top + h, left:left + w])
  out = np.asarray(crop.resize((size, size), Image.BILINEAR, reducing_gap=None))
  if flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def crop_and_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                  scale=(0.35, 1.0)) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [size, size, 3]: random-resized crop (bilinear) + random flip."""
  box, flip = sample_view(*image.shape[:2], rng, scale)
  return apply_view(image, size, box, flip)
