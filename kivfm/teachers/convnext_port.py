"""Weights of DINOv3 ConvNeXt backbones -> `kivfm.models.convnext.ConvNeXt`.

Like `vit_port`: each converter checks every key and shape (one ShapeMismatchError naming all
missing, unexpected and misshapen keys) and returns the nested pure dict of
`nnx.state(ConvNeXt(cfg))`. Layouts:
  * HF `DINOv3ConvNextModel`: `stages.{i}.downsample_layers.{0,1}`, `stages.{i}.layers.{j}.*`,
    `layer_norm.*`; hub files as they are, transformers' in-memory state dict with the stages
    under `model.`; any outer prefix;
  * facebookresearch/dinov3 (`dinov3/models/convnext.py`): `downsample_layers.{i}.{0,1}`,
    `stages.{i}.{j}.*`, `norm.*` (its duplicate `norms.3.*` is ignored).
Conversions: Linear [out, in] -> [in, out]; Conv OIHW -> HWIO (depthwise [C, 1, 7, 7] ->
[7, 7, 1, C]).
"""
from __future__ import annotations

from typing import Callable

from flax import nnx

from kivfm.models.convnext import ConvNeXt, ConvNeXtConfig
from kivfm.teachers.vit_port import StateDict, _Port, _prefix

_HF_BLOCK = ('depthwise_conv', 'layer_norm', 'pointwise_conv1', 'pointwise_conv2')
_ORIGINAL_BLOCK = ('dwconv', 'norm', 'pwconv1', 'pwconv2')


def config_from_hf(hf_config) -> ConvNeXtConfig:
  """ConvNeXtConfig of a transformers DINOv3ConvNextConfig."""
  if hf_config.hidden_act != 'gelu':
    raise ValueError(f'unsupported DINOv3 ConvNeXt activation {hf_config.hidden_act!r}; '
                     'supported: gelu')
  return ConvNeXtConfig(dims=tuple(hf_config.hidden_sizes), depths=tuple(hf_config.depths),
                        norm_eps=hf_config.layer_norm_eps,
                        layerscale=hf_config.layer_scale_init_value)


def _port(cfg: ConvNeXtConfig, downsample: Callable[[int], str],
          block: Callable[[int, int], str], names: tuple[str, ...], final_norm: str) -> _Port:
  """Rules of one layout: `downsample(i)` names stage i's (conv, norm) pair, `block(i, j)` its
  block j; `names`: a block's depthwise conv, norm and two pointwise Linears."""
  port = _Port(lambda: ConvNeXt(cfg, rngs=nnx.Rngs(0)))
  dwconv, norm, pw1, pw2 = names
  for i, depth in enumerate(cfg.depths):
    t = ('stages', i)
    conv_index, norm_index = (0, 1) if i == 0 else (1, 0)
    port.conv(f'{downsample(i)}.{conv_index}', (*t, 'conv'))
    port.norm(f'{downsample(i)}.{norm_index}', (*t, 'norm'))
    for j in range(depth):
      s, b = block(i, j), (*t, 'blocks', j)
      port.conv(s + dwconv, (*b, 'dwconv'))
      port.norm(s + norm, (*b, 'norm'))
      port.dense(s + pw1, (*b, 'mlp', 'fc1'))
      port.dense(s + pw2, (*b, 'mlp', 'fc2'))
      port.copy(s + 'gamma', (*b, 'gamma'))
  port.norm(final_norm, ('norm',))
  return port


def original_layout(state: StateDict) -> bool:
  """Whether a ConvNeXt state dict is in the facebookresearch layout (not HF's)."""
  return any(k.endswith('downsample_layers.0.0.weight') for k in state)  # HF: ...layers.0.weight


def from_dinov3_convnext_hf(state: StateDict, cfg: ConvNeXtConfig,
                            source: str = 'HF DINOv3 ConvNeXt state dict') -> dict:
  """HF `DINOv3ConvNextModel` (hub `stages.*` or in-memory `model.stages.*`, any outer prefix;
  the final `layer_norm` sits next to `model.`) -> ConvNeXt pure dict."""
  p = _prefix(state, 'stages.0.downsample_layers.0.weight', source)
  port = _port(cfg, lambda i: f'{p}stages.{i}.downsample_layers',
               lambda i, j: f'{p}stages.{i}.layers.{j}.', _HF_BLOCK,
               p.removesuffix('model.') + 'layer_norm')
  return port.convert(state, [], source)


def from_dinov3_convnext_original(state: StateDict, cfg: ConvNeXtConfig,
                                  source: str = 'DINOv3 ConvNeXt checkpoint') -> dict:
  """facebookresearch/dinov3 ConvNeXt checkpoint (any prefix) -> ConvNeXt pure dict."""
  p = _prefix(state, 'downsample_layers.0.0.weight', source)
  port = _port(cfg, lambda i: f'{p}downsample_layers.{i}', lambda i, j: f'{p}stages.{i}.{j}.',
               _ORIGINAL_BLOCK, p + 'norm')
  # norms.3: the final norm registered a second time (for `get_intermediate_layers`).
  return port.convert(state, [f'{p}norms.'], source)
