"""Extract a teacher's features for a folder of images into one .npz.

  python -m kivfm.extract --teacher=efficientnet-lite0 --images=DIR --out=feats.npz

Writes 'files' (relative paths), 'cls' [N, D] and, with --patches, 'patches' [N, h, w, D], plus
each native output of the teacher (e.g. 'logits'). Images are centre-cropped to a square and
resized to the teacher's resolution; undecodable files are skipped, listed and counted.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kivfm import teachers
from kivfm.data import images as image_files
from kivfm.weights import readers

_TEACHER = flags.DEFINE_string('teacher', None, 'Registered teacher name.')
_IMAGES = flags.DEFINE_string('images', None, 'Folder of images (searched recursively).')
_OUT = flags.DEFINE_string('out', None, 'Output .npz file.')
_WEIGHTS = flags.DEFINE_string('weights', 'pretrained', "'pretrained' or a weight file path.")
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 0, 'Input side (0: the teacher native size).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Images per forward pass.')
_PATCHES = flags.DEFINE_boolean('patches', False, 'Also save the patch / feature maps.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')


def extract(teacher, paths: list[str], root: str, batch_size: int, patches: bool):
  """-> (outputs dict of stacked arrays, kept relative paths, skipped [(path, reason)])."""
  forward = jax.jit(lambda x: teacher(x))
  side = teacher.image_size[0]
  kept, skipped, chunks = [], [], []
  batch, names = [], []

  def flush():
    out = forward(np.stack(batch))
    keep = {k: np.asarray(v, np.float32) for k, v in out.items()
            if hasattr(v, 'shape') and (patches or k != 'patches')}
    chunks.append(keep)
    kept.extend(names)
    batch.clear()
    names.clear()

  for path in paths:
    try:
      with open(path, 'rb') as f:
        image = image_files.decode(f.read(), path)
    except (image_files.BadImageError, OSError) as e:
      skipped.append((path, str(e)))
      continue
    batch.append(image_files.center_square(image, side))
    names.append(os.path.relpath(path, root))
    if len(batch) == batch_size:
      flush()
  if batch:
    flush()
  if not chunks:
    return {}, kept, skipped
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, kept, skipped


def main(argv):
  del argv
  for flag in (_TEACHER, _IMAGES, _OUT):
    if not flag.value:
      sys.exit(f'--{flag.name} is required')
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[_DTYPE.value]
  teacher = teachers.load(_TEACHER.value, weights=_WEIGHTS.value, image_size=_IMAGE_SIZE.value,
                          dtype=dtype)
  paths = image_files.list_images(_IMAGES.value)
  if not paths:
    sys.exit(f'no images found in {_IMAGES.value!r} (extensions: '
             f'{", ".join(image_files.EXTENSIONS)})')
  out, kept, skipped = extract(teacher, paths, _IMAGES.value, _BATCH.value, _PATCHES.value)
  for path, reason in skipped:
    print(f'skipped {reason}', file=sys.stderr)
  if not kept:
    sys.exit('no image could be decoded')
  readers.save_npz(_OUT.value, {'files': np.array(kept), **out})
  shapes = ', '.join(f'{k} {v.shape}' for k, v in out.items())
  print(f'{len(kept)} images -> {_OUT.value} ({shapes}); {len(skipped)} skipped')


if __name__ == '__main__':
  app.run(main)
