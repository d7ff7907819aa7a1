"""Frozen teachers: build by registry name, preprocess on device, load weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm.models import layers
from kivfm.teachers import registry


def _build_vit(arch, **kw):
  from kivfm.models.vit import ViT
  return ViT(arch, **kw)


FAMILIES = {'vit': _build_vit}


class Teacher(nnx.Module):
  """A teacher as the trainer sees it: uint8 NHWC views in, its output dict out.

  The view is resized to the teacher's own resolution and normalised with its own mean/std on
  device, so the student and every teacher see the same augmented image.
  """

  def __init__(self, spec: registry.TeacherSpec, *, image_size: int | tuple[int, int] = 0,
               dtype=jnp.bfloat16, rngs: nnx.Rngs):
    self.spec = spec
    size = image_size or spec.image_size
    self.image_size = (size, size) if isinstance(size, int) else tuple(size)
    self.dtype = dtype
    self.model = FAMILIES[spec.family](spec.arch, dtype=dtype, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict:
    x = layers.preprocess(images, self.image_size, self.spec.mean, self.spec.std, self.dtype)
    return self.model(x)


def build(name: str, *, image_size: int | tuple[int, int] = 0, dtype=jnp.bfloat16,
          seed: int = 0) -> Teacher:
  """A teacher with randomly initialised weights (load real ones with `pretrained_params`)."""
  return Teacher(registry.get(name), image_size=image_size, dtype=dtype, rngs=nnx.Rngs(seed))


def pretrained_params(spec: registry.TeacherSpec, weights: str) -> dict:
  """The teacher's parameters as a pure dict {'model': ...} from 'pretrained' or a file path."""
  if not spec.sources and weights == 'pretrained':
    raise ValueError(f'teacher {spec.name!r} has no pretrained weights; use weights="random" '
                     f'or give a file path')
  raise ValueError(f'teacher {spec.name!r}: loading weights from {weights!r} is not available '
                   f'for the {spec.family!r} family yet')
