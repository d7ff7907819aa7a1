"""Instance-annotated images for the segmentation and detection evaluators, as records
{'image', 'label', 'boxes', 'classes', 'masks'} (the layout of `kivfm.data.pasted`), named by a
source spec (`open_instances`):
  pasted:SPLIT                     the generated pasted-objects set (`kivfm.data.pasted`)
  coco:ANNOTATIONS.json:IMAGE_DIR  COCO-format instance annotations and their image folder

COCO-format files: each image is cut to its centred square and resized to `size` (masks with nearest neighbours);
objects are rasterised from polygons or RLE (compressed or not), cut the same way, and dropped
when nothing of them is left; crowd annotations are skipped. Classes are 1 + the position of the
category id among the file's sorted category ids (0 is background in the label map, where later
annotations cover earlier ones).
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from kivfm.data import images, pasted
from kivfm.data.pasted import mask_boxes
from kivfm.errors import ConfigError


def rle_counts(counts: str | list[int]) -> list[int]:
  """Run lengths of an RLE: a list as is, or COCO's compressed string (6-bit groups, 5 payload
  bits each, 0x20 = more groups follow, 0x10 in the last group = negative; from the third run on
  each value is a difference to the run two before)."""
  if not isinstance(counts, str):
    return list(counts)
  runs, position = [], 0
  while position < len(counts):
    value, shift, more = 0, 0, True
    while more:
      group = ord(counts[position]) - 48
      value |= (group & 0x1f) << shift
      more = bool(group & 0x20)
      position += 1
      shift += 5
      if not more and group & 0x10:
        value |= -1 << shift
    if len(runs) > 2:
      value += runs[-2]
    runs.append(value)
  return runs


def rle_mask(rle: dict) -> np.ndarray:
  """bool [h, w] of an RLE {'size': [h, w], 'counts': ...} (runs alternate 0 / 1, column-major)."""
  h, w = rle['size']
  flat = np.zeros(h * w, bool)
  position, value = 0, False
  for run in rle_counts(rle['counts']):
    flat[position:position + run] = value
    position += run
    value = not value
  return flat.reshape(w, h).T


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
  """bool [height, width]: pixels whose centre lies inside any polygon [x0, y0, x1, y1, ...]
  (even-odd rule; COCO coordinates, pixel (r, c) spans [c, c + 1] x [r, r + 1])."""
  ys, xs = np.mgrid[:height, :width] + 0.5
  mask = np.zeros((height, width), bool)
  for polygon in polygons:
    x, y = np.asarray(polygon[::2], np.float64), np.asarray(polygon[1::2], np.float64)
    inside = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in zip(x, y, np.roll(x, -1), np.roll(y, -1)):
      crossing = (y0 > ys) != (y1 > ys)
      at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0 if y1 != y0 else 1.0)
      inside ^= crossing & (xs < at)
    mask |= inside
  return mask


class CocoJson:
  """Records of the first `limit` images (0: all) of a COCO annotation file, at `size`."""

  def __init__(self, annotations: str, image_dir: str, size: int, limit: int = 0):
    with open(annotations, encoding='utf-8') as f:
      data = json.load(f)
    self.category_ids = sorted(c['id'] for c in data['categories'])
    self.class_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
    self.images = data['images'][:limit or None]
    self.objects = {image['id']: [] for image in self.images}
    for ann in data['annotations']:
      if ann['image_id'] in self.objects and not ann.get('iscrowd', 0):
        self.objects[ann['image_id']].append(ann)
    self.image_dir, self.size = image_dir, size

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    info = self.images[index]
    path = os.path.join(self.image_dir, info['file_name'])
    with open(path, 'rb') as f:
      image = images.decode(f.read(), path)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = lambda x, method: np.asarray(Image.fromarray(x[top:top + side, left:left + side])
                                          .resize((self.size, self.size), method))
    masks, classes = [], []
    for ann in self.objects[info['id']]:
      seg = ann['segmentation']
      full = rle_mask(seg) if isinstance(seg, dict) else polygon_mask(seg, h, w)
      mask = square(full.astype(np.uint8) * 255, Image.NEAREST) > 127
      if mask.any():
        masks.append(mask)
        classes.append(self.class_of[ann['category_id']])
    label = np.zeros((self.size, self.size), np.int32)
    for mask, cls in zip(masks, classes):
      label[mask] = cls
    masks = np.stack(masks) if masks else np.zeros((0, self.size, self.size), bool)
    return {'image': square(image, Image.BILINEAR), 'label': label, 'boxes': mask_boxes(masks),
            'classes': np.asarray(classes, np.int32), 'masks': masks}


def open_instances(spec: str, limit: int, size: int, data) -> tuple[list[dict], int]:
  """(records of the first `limit` images at `size`, number of object classes) of `spec`."""
  kind, _, argument = spec.partition(':')
  if kind == 'pasted':
    source = pasted.PastedObjects(limit or 500, argument or 'train', size=size,
                                  fashion_mnist_dir=data.fashion_mnist_dir)
    num_classes = pasted.NUM_CLASSES - 1
  elif kind == 'coco' and argument.count(':') == 1:
    source = CocoJson(*argument.split(':'), size=size, limit=limit)
    num_classes = source.num_classes
  else:
    raise ConfigError(f'instance source {spec!r}: use pasted:SPLIT or '
                      f'coco:ANNOTATIONS.json:IMAGE_DIR')
  return [source[i] for i in range(len(source))], num_classes
