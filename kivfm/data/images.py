"""Image files: listing and decoding to uint8 RGB (grey, palette and RGBA converted)."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


class BadImageError(ValueError):
  """An image that cannot be decoded (corrupt, truncated, not an image)."""


def list_images(directory: str) -> list[str]:
  """Image files below `directory`, sorted, by extension."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'image folder {directory!r} does not exist')
  found = []
  for root, _, files in os.walk(directory):
    found.extend(os.path.join(root, f) for f in files if f.lower().endswith(EXTENSIONS))
  return sorted(found)


def decode(data: bytes, name: str = '<bytes>') -> np.ndarray:
  """Encoded image bytes -> uint8 [H, W, 3]; raises BadImageError naming `name`."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return np.asarray(image.convert('RGB'), dtype=np.uint8)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise BadImageError(f'{name}: cannot decode image ({e})') from e


def center_square(image: np.ndarray, size: int) -> np.ndarray:
  """Largest centred square crop, resized (bilinear) to size x size."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = Image.fromarray(image[top:top + side, left:left + side])
  return np.asarray(crop.resize((size, size), Image.BILINEAR))
