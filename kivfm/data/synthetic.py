"""A synthetic image source: deterministic smooth random images, no files needed."""
from __future__ import annotations

import numpy as np
from PIL import Image


class SyntheticImages:
  """Random-access source of `num_examples` uint8 RGB images [size, size, 3].

  Example i is a 4x4 random colour grid (seeded by `seed` and i) upsampled bicubically plus
  fine noise, so images differ in layout and texture, and is the same on every call.
  """

  def __init__(self, num_examples: int, size: int = 64, seed: int = 0):
    self.num_examples, self.size, self.seed = num_examples, size, seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    rng = np.random.default_rng((self.seed, index))
    grid = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(grid).resize((self.size, self.size), Image.BICUBIC))
    noise = rng.integers(-12, 13, image.shape)
    return {'image': np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)}
