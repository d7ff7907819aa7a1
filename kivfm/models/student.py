"""The student: the knowledge-base ViT (frozen by the optimizer groups) plus an adapter."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm.models import adapters, layers
from kivfm.models.vit import ViT, ViTConfig


class Student(nnx.Module):
  """f(I) = {x, V}: uint8 NHWC views -> {'cls': [B, D], 'patches': [B, h, w, D]}.

  Preprocessing is the knowledge-base teacher's, so at step 0 (adapters are no-ops) the student
  computes exactly what that teacher computes on the same view. With `adapter_blocks` = K > 0
  only the last K blocks carry adapters and the blocks below them are the teacher's own: `trunk`
  computes them, `from_trunk` the rest (training shares the trunk with that teacher).
  """

  def __init__(self, arch: ViTConfig, *, image_size: tuple[int, int], mean, std,
               adapter: str = 'bottleneck', adapter_dim: int = 64, adapter_scale: float = 1.0,
               lora_rank: int = 8, lora_alpha: float = 16.0, adapter_blocks: int = 0,
               remat: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.vit = ViT(arch, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    adapters.attach(self.vit, adapter, dim=adapter_dim, scale=adapter_scale, rank=lora_rank,
                    alpha=lora_alpha, blocks=adapter_blocks, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)
    self.first_adapted = adapters.first_adapted(arch.depth, adapter_blocks)
    self.image_size, self.mean, self.std, self.dtype = tuple(image_size), mean, std, dtype

  @property
  def grid(self) -> tuple[int, int]:
    """The patch grid at the training size."""
    return tuple(s // self.vit.cfg.patch_size for s in self.image_size)

  def __call__(self, images: jax.Array, size: tuple[int, int] | None = None) -> dict:
    """`size`: the resolution the views are resized to (default: the training size); any
    multiple of the patch size, the position embeddings are interpolated to its grid."""
    return self.from_trunk(*self.trunk(images, size))

  def trunk(self, images: jax.Array, size: tuple[int, int] | None = None
            ) -> tuple[jax.Array, tuple[int, int]]:
    """Tokens after the blocks below the first adapter, and the patch grid."""
    x = layers.preprocess(images, size or self.image_size, self.mean, self.std, self.dtype)
    tokens, grid = self.vit.tokens(x)
    tokens, _ = self.vit.run_blocks(tokens, grid, 0, stop=self.first_adapted)
    return tokens, grid

  def from_trunk(self, tokens: jax.Array, grid: tuple[int, int]) -> dict:
    """f(I) from `trunk`'s output: the adapted blocks and the final norm."""
    tokens, _ = self.vit.run_blocks(tokens, grid, self.first_adapted)
    out = self.vit.outputs(tokens, grid)
    return {'cls': out['cls'], 'patches': out['patches']}
