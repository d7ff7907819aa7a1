"""Images to uint8 RGB: listing files, decoding bytes and checking arrays (grey, palette and RGBA
converted; anything else raises BadImageError)."""
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
  except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
          ValueError) as e:
    raise BadImageError(f'{name}: cannot decode image ({e})') from e


def to_rgb(image, name: str = '<image>') -> np.ndarray:
  """Encoded bytes or a uint8 [H, W], [H, W, 1|3|4] array -> uint8 [H, W, 3] (grey repeated,
  alpha dropped); raises BadImageError naming `name` for any other dtype or shape."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return decode(bytes(image), name)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise BadImageError(f'{name}: image of dtype {array.dtype}, expected uint8')
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
    raise BadImageError(f'{name}: image of shape {array.shape}, expected [H, W] or '
                        f'[H, W, 1|3|4]')
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[..., :3])


def center_square(image: np.ndarray, size: int) -> np.ndarray:
  """Largest centred square crop, resized (bilinear) to size x size."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  crop = Image.fromarray(image[top:top + side, left:left + side])
  return np.asarray(crop.resize((size, size), Image.BILINEAR))
