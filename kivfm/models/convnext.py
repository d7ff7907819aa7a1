"""ConvNeXt as the DINOv3 ConvNeXt backbones use it (HF `DINOv3ConvNextModel`), inference only.

Stage i: downsampling (stage 0: conv 4x4 / 4 -> LayerNorm; later: LayerNorm -> conv 2x2 / 2, both
'VALID': a side not divisible by the stride is floored, as torch does), then blocks: depthwise
conv 7x7 -> LayerNorm -> Dense 4x -> act -> Dense -> * gamma, + residual. A final LayerNorm is
applied to the mean-pooled vector and to every token of the last stage.

Output contract (a dict):
  'cls'      [B, C] final norm of the mean-pooled last stage (HF `pooler_output`);
  'patches'  [B, h, w, C] final norm of every last-stage token, stride 32 (HF
             `last_hidden_state[:, 1:]`);
  'hidden'   tuple of [B, h_i, w_i, C_i] outputs of the stages listed in `return_layers`, without
             the final norm (HF `hidden_states[i + 1]`, NHWC).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm.models import layers

# size -> (dims, depths) of the DINOv3 ConvNeXt backbones.
SIZES = {'tiny': ((96, 192, 384, 768), (3, 3, 9, 3)),
         'small': ((96, 192, 384, 768), (3, 3, 27, 3)),
         'base': ((128, 256, 512, 1024), (3, 3, 27, 3)),
         'large': ((192, 384, 768, 1536), (3, 3, 27, 3))}


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
  """Architecture of a ConvNeXt; the defaults are ConvNeXt-T."""
  dims: tuple[int, ...] = (96, 192, 384, 768)   # channels of each stage
  depths: tuple[int, ...] = (3, 3, 9, 3)        # blocks of each stage
  norm_eps: float = 1e-6
  layerscale: float = 1e-6                      # init value of the blocks' gamma
  act: str = 'gelu'                             # a `layers.ACTIVATIONS` name

  def __post_init__(self):
    if len(self.dims) != len(self.depths):
      raise ValueError(f'dims {self.dims} and depths {self.depths} differ in length')

  @property
  def width(self) -> int:
    return self.dims[-1]


def convnext_config(size: str) -> ConvNeXtConfig:
  """The DINOv3 ConvNeXt-{tiny, small, base, large} configuration."""
  if size not in SIZES:
    raise ValueError(f'unknown ConvNeXt size {size!r}; allowed: {", ".join(SIZES)}')
  dims, depths = SIZES[size]
  return ConvNeXtConfig(dims=dims, depths=depths)


class Block(nnx.Module):
  """Depthwise 7x7 -> LayerNorm -> MLP (4x) -> * gamma, + residual."""

  def __init__(self, dim: int, cfg: ConvNeXtConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dwconv = layers.Conv(dim, dim, 7, padding=((3, 3), (3, 3)), groups=dim,
                              axes=(None, 'embed'), **kw)
    self.norm = layers.LayerNorm(dim, eps=cfg.norm_eps, **kw)
    self.mlp = layers.Mlp(dim, 4 * dim, act=cfg.act, **kw)
    self.gamma = layers.param(rngs, nnx.initializers.constant(cfg.layerscale), (dim,), ('norm',),
                              param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.mlp(self.norm(self.dwconv(x)))
    return x + h * self.gamma[...].astype(self.dtype)


class Stage(nnx.Module):
  """Downsampling (stage 0: conv 4x4 / 4 -> norm; later: norm -> conv 2x2 / 2), then blocks."""

  def __init__(self, cfg: ConvNeXtConfig, index: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dim = cfg.dims[index]
    self.stem = index == 0
    if self.stem:
      self.conv = layers.Conv(3, dim, 4, stride=4, padding='VALID', axes=(None, 'embed'), **kw)
      self.norm = layers.LayerNorm(dim, eps=cfg.norm_eps, **kw)
    else:
      prev = cfg.dims[index - 1]
      self.norm = layers.LayerNorm(prev, eps=cfg.norm_eps, **kw)
      self.conv = layers.Conv(prev, dim, 2, stride=2, padding='VALID', axes=('conv_in', 'embed'),
                              **kw)
    self.blocks = nnx.List([Block(dim, cfg, **kw) for _ in range(cfg.depths[index])])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.norm(self.conv(x)) if self.stem else self.conv(self.norm(x))
    for block in self.blocks:
      x = block(x)
    return x


class ConvNeXt(nnx.Module):
  """ConvNeXt over normalised NHWC images of any size (at least 32 x 32)."""

  def __init__(self, cfg: ConvNeXtConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg, self.dtype = cfg, dtype
    self.stages = nnx.List([Stage(cfg, i, **kw) for i in range(len(cfg.dims))])
    self.norm = layers.LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)

  def __call__(self, images: jax.Array, return_layers: tuple[int, ...] = ()) -> dict:
    x, hidden = images, []
    for i, stage in enumerate(self.stages):
      x = stage(x)
      if i in return_layers:
        hidden.append(x)
    pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    return {'cls': self.norm(pooled), 'patches': self.norm(x), 'hidden': tuple(hidden)}
