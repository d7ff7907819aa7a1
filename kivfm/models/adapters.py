"""Adapters that turn a frozen ViT into a trainable student, each an exact no-op at step 0."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm.models import layers


def first_adapted(depth: int, blocks: int) -> int:
  """Index of the first block with an adapter when the last `blocks` have one (0: all)."""
  if not 0 <= blocks <= depth:
    raise ValueError(f'adapter blocks {blocks} must be in [0, {depth}] (0: every block)')
  return depth - blocks if blocks else 0


class Bottleneck(nnx.Module):
  """Parallel bottleneck s * Up(GELU(Down(LN(h)))); Up starts at zero."""

  def __init__(self, width: int, dim: int, scale: float, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = layers.LayerNorm(width, **kw)
    self.down = layers.Dense(width, dim, axes=('embed', 'mlp'), **kw)
    self.up = layers.Dense(dim, width, axes=('mlp', 'embed'), kernel_init=layers.zeros, **kw)
    self.scale = scale

  def __call__(self, h: jax.Array) -> jax.Array:
    return self.scale * self.up(layers.gelu(self.down(self.norm(h))))


def attach(vit: nnx.Module, kind: str, *, dim: int = 64, scale: float = 1.0, rank: int = 8,
           alpha: float = 16.0, blocks: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
           rngs: nnx.Rngs) -> None:
  """Adds adapters to the last `blocks` blocks of `vit` (0: every block) in place:
  'bottleneck', 'lora' or 'none'."""
  if kind == 'none':
    return
  for block in vit.blocks[first_adapted(len(vit.blocks), blocks):]:
    if kind == 'bottleneck':
      block.adapter = nnx.data(Bottleneck(vit.cfg.width, dim, scale, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs))
    elif kind == 'lora':
      for _, module in nnx.iter_graph(block):
        if isinstance(module, layers.Dense):
          module.add_lora(rank, alpha, rngs=rngs)
    else:
      raise ValueError(f'unknown adapter {kind!r}; allowed: bottleneck, lora, none')
