"""EfficientNet-Lite weights: lukemelas-style PyTorch state dicts -> `EfficientNetLite` state.

Keys: `_conv_stem`, `_bn0`, `_blocks.{i}._{expand,depthwise,project}_conv` with `_bn{0,1,2}`,
`_conv_head`, `_bn1`, `_fc`; `num_batches_tracked` is ignored. Conv kernels OIHW -> HWIO (depthwise
[C, 1, k, k] -> [k, k, 1, C], used with feature_group_count=C); Linear [out, in] -> [in, out].
"""
from __future__ import annotations

import numpy as np
from flax import nnx, traverse_util

from kivfm.models.efficientnet import EfficientNetLite, EfficientNetLiteConfig, block_specs
from kivfm.weights.errors import check_keys_and_shapes

BN_NAMES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}


def torch_names(cfg: EfficientNetLiteConfig) -> dict[str, tuple]:
  """PyTorch key -> path in `nnx.to_pure_dict(nnx.state(EfficientNetLite(cfg)))`."""
  names = {}

  def conv_bn(path: tuple, conv: str, bn: str):
    names[f'{conv}.weight'] = (*path, 'conv', 'kernel')
    names.update({f'{bn}.{t}': (*path, 'bn', f) for t, f in BN_NAMES.items()})

  conv_bn(('stem',), '_conv_stem', '_bn0')
  for i, spec in enumerate(block_specs(cfg)):
    if spec.expand != 1:
      conv_bn(('blocks', i, 'expand'), f'_blocks.{i}._expand_conv', f'_blocks.{i}._bn0')
    conv_bn(('blocks', i, 'depthwise'), f'_blocks.{i}._depthwise_conv', f'_blocks.{i}._bn1')
    conv_bn(('blocks', i, 'project'), f'_blocks.{i}._project_conv', f'_blocks.{i}._bn2')
  conv_bn(('head',), '_conv_head', '_bn1')
  names.update({'_fc.weight': ('fc', 'kernel'), '_fc.bias': ('fc', 'bias')})
  return names


def _to_flax(x: np.ndarray) -> np.ndarray:
  """OIHW -> HWIO, [out, in] -> [in, out], vectors unchanged."""
  axes = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}[x.ndim]
  return np.ascontiguousarray(np.transpose(x, axes))


def _torch_shape(shape: tuple) -> tuple:
  """The PyTorch shape of a flax parameter of `shape` (inverse of `_to_flax`)."""
  axes = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}[len(shape)]
  return tuple(shape[a] for a in axes)


def convert_efficientnet_lite(state_dict: dict[str, np.ndarray], cfg: EfficientNetLiteConfig,
                              source: str = 'efficientnet-lite state dict') -> dict:
  """Nested pure dict (float32 numpy) of the model's parameters.

  Raises `kivfm.weights.errors.ShapeMismatchError` naming every missing key, unexpected key and
  wrong shape (PyTorch names and layouts).
  """
  abstract = nnx.eval_shape(lambda: EfficientNetLite(cfg, rngs=nnx.Rngs(0)))
  shapes = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  names = torch_names(cfg)
  expected = {key: _torch_shape(shapes[path].shape) for key, path in names.items()}
  got = {k: v for k, v in state_dict.items() if not k.endswith('.num_batches_tracked')}
  check_keys_and_shapes(expected, got, source)
  return traverse_util.unflatten_dict(
      {names[k]: _to_flax(np.asarray(v, np.float32)) for k, v in got.items()})
