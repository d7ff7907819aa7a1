"""One configurable Vision Transformer (DINOv2-style core; options cover other families).

Output contract (a dict): 'cls' [B, D] global token after the final norm (or mean-pooled
patches when the model has no class token), 'patches' [B, h, w, D] patch tokens after the final
norm, and 'hidden' (a tuple of [B, N, D] token sequences of the layers in `return_layers`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kivfm.models import layers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a ViT; the defaults are DINOv2-style."""
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  patch_size: int = 14
  pos_grid: tuple[int, int] = (37, 37)   # grid the position embeddings are stored for
  act: str = 'gelu'                      # gelu | gelu_tanh | quick_gelu | swiglu
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  class_token: bool = True
  num_registers: int = 0
  layerscale: float | None = 1.0         # init value of LayerScale; None = no LayerScale
  final_norm: bool = True

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def cubic_resize_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out, in] matrix of PyTorch's bicubic interpolation (align_corners=False, no antialias)."""
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    src = (o + 0.5) * scale - 0.5
    i0 = math.floor(src)
    t = src - i0
    weights = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
               ((a + 2) * t - (a + 3)) * t * t + 1,
               ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1]
    weights.append(1.0 - sum(weights))
    for k, w in enumerate(weights):
      m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w
  return m


def resize_pos_embed(grid: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bicubic resize of a [gh, gw, D] position-embedding grid to `size`, as torch computes it."""
  if tuple(grid.shape[:2]) == tuple(size):
    return grid
  mh = jnp.asarray(cubic_resize_matrix(grid.shape[0], size[0]), jnp.float32)
  mw = jnp.asarray(cubic_resize_matrix(grid.shape[1], size[1]), jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  out = jnp.einsum('oh,hwd->owd', mh, grid.astype(jnp.float32), precision=hp)
  return jnp.einsum('pw,owd->opd', mw, out, precision=hp).astype(grid.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with separate q, k, v projections."""

  def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.width
    self.query = layers.Dense(d, d, axes=('embed', 'heads'), use_bias=cfg.qkv_bias, **kw)
    self.key = layers.Dense(d, d, axes=('embed', 'heads'), use_bias=cfg.qkv_bias, **kw)
    self.value = layers.Dense(d, d, axes=('embed', 'heads'), use_bias=cfg.qkv_bias, **kw)
    self.out = layers.Dense(d, d, axes=('heads', 'embed'), **kw)
    self.num_heads = cfg.num_heads

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    split = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(d // self.num_heads)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return self.out(jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, d))


class LayerScale(nnx.Module):

  def __init__(self, width: int, init: float, *, param_dtype, rngs: nnx.Rngs):
    self.gamma = layers.param(rngs, nnx.initializers.constant(init), (width,), ('norm',),
                              param_dtype)

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block. `adapter` (set by `kivfm.models.adapters`) runs in parallel:
  out = block(x) + adapter(x)."""

  def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layers.LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
    self.attn = Attention(cfg, **kw)
    self.norm2 = layers.LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
    self.mlp = layers.Mlp(cfg.width, cfg.mlp_dim, act=cfg.act, **kw)
    if cfg.layerscale is not None:
      self.ls1 = LayerScale(cfg.width, cfg.layerscale, param_dtype=param_dtype, rngs=rngs)
      self.ls2 = LayerScale(cfg.width, cfg.layerscale, param_dtype=param_dtype, rngs=rngs)
    else:
      self.ls1 = self.ls2 = None
    self.adapter = None

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = lambda ls, h: h if ls is None else ls(h)
    h = x + scale(self.ls1, self.attn(self.norm1(x)))
    h = h + scale(self.ls2, self.mlp(self.norm2(h)))
    if self.adapter is not None:
      h = h + self.adapter(x)
    return h


class ViT(nnx.Module):
  """Vision Transformer over normalised NHWC images of any size divisible by the patch."""

  def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    p, d = cfg.patch_size, cfg.width
    self.patch_embed = layers.Conv(3, d, p, stride=p, padding='VALID', axes=(None, 'embed'), **kw)
    num_extra = int(cfg.class_token)
    self.cls_token = (layers.param(rngs, layers.trunc_normal, (1, 1, d), (None, None, 'embed'),
                                   param_dtype) if cfg.class_token else None)
    self.registers = (layers.param(rngs, layers.trunc_normal, (1, cfg.num_registers, d),
                                   (None, 'tokens', 'embed'), param_dtype)
                      if cfg.num_registers else None)
    gh, gw = cfg.pos_grid
    self.pos_embed = layers.param(rngs, layers.trunc_normal, (1, num_extra + gh * gw, d),
                                  (None, 'tokens', 'embed'), param_dtype)
    self.blocks = nnx.List([Block(cfg, **kw) for _ in range(cfg.depth)])
    self.norm = layers.LayerNorm(d, eps=cfg.norm_eps, **kw) if cfg.final_norm else None

  def embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """Patch + position embeddings, class and register tokens -> ([B, N, D], grid)."""
    cfg = self.cfg
    x = self.patch_embed(images)
    b, h, w, d = x.shape
    pos = self.pos_embed[...].astype(self.dtype)
    n_cls = int(cfg.class_token)
    grid = pos[0, n_cls:].reshape(*cfg.pos_grid, d)
    x = x + resize_pos_embed(grid, (h, w)).reshape(1, h, w, d)
    x = x.reshape(b, h * w, d)
    if cfg.class_token:
      cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype) + pos[:, :1], (b, 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    if self.registers is not None:
      reg = jnp.broadcast_to(self.registers[...].astype(self.dtype), (b, cfg.num_registers, d))
      x = jnp.concatenate([x[:, :n_cls], reg, x[:, n_cls:]], axis=1)
    return x, (h, w)

  def __call__(self, images: jax.Array, return_layers: tuple[int, ...] = ()) -> dict:
    cfg = self.cfg
    x, (h, w) = self.embed(images)
    hidden = []
    for i, block in enumerate(self.blocks):
      x = nnx.remat(type(block).__call__)(block, x) if self.remat else block(x)
      if i in return_layers:
        hidden.append(x)
    if self.norm is not None:
      x = self.norm(x)
    n_prefix = int(cfg.class_token) + cfg.num_registers
    patches = x[:, n_prefix:]
    cls = x[:, 0] if cfg.class_token else patches.mean(axis=1)
    return {'cls': cls, 'patches': patches.reshape(x.shape[0], h, w, -1), 'hidden': tuple(hidden)}
