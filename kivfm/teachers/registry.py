"""Registry of teachers: name -> what the model is, how it is fed, where its weights come from.

A teacher is added with one family module (model + weight conversion), one `register(...)` here
and a parity test; the trainer never changes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """A registered teacher.

  family: model family ('vit' or 'efficientnet'); arch: that family's config dataclass;
  image_size: native input (height, width); mean/std: input normalisation of [0, 1] pixels;
  sources: where the pretrained weights come from (empty: random init only, for tests);
  converter: name of the function in the family's port module for these sources;
  outputs: native head outputs beyond 'cls' and 'patches'.
  """
  name: str
  family: str
  arch: Any
  image_size: tuple[int, int]
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  sources: tuple[Any, ...] = ()
  converter: str = ''
  outputs: tuple[str, ...] = ()
  licence: str = ''
  description: str = ''


_REGISTRY: dict[str, TeacherSpec] = {}


def register(spec: TeacherSpec) -> TeacherSpec:
  if spec.name in _REGISTRY:
    raise ValueError(f'teacher {spec.name!r} is registered twice')
  _REGISTRY[spec.name] = spec
  return spec


def get(name: str) -> TeacherSpec:
  if name not in _REGISTRY:
    raise KeyError(f'unknown teacher {name!r}; registered: {", ".join(names())}')
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _register_tiny() -> None:
  """Tiny randomly initialised teachers for smoke runs and tests (no weights anywhere)."""
  from kivfm.models.vit import ViTConfig
  tiny = dict(patch_size=8, pos_grid=(4, 4), num_heads=2)
  register(TeacherSpec(
      name='tiny-dino', family='vit', image_size=(32, 32),
      arch=ViTConfig(width=32, depth=2, mlp_dim=64, **tiny),
      description='2-block DINOv2-shaped ViT, width 32, random init (tests).'))
  register(TeacherSpec(
      name='tiny-vit-b', family='vit', image_size=(48, 48),
      arch=ViTConfig(width=48, depth=2, mlp_dim=96, layerscale=None, **tiny),
      description='2-block ViT without LayerScale, width 48, random init (tests).'))


_register_tiny()
