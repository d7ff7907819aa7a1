"""Latent unifier: per-teacher student-to-teacher (s2t) heads."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm.models import layers


class MlpHead(nnx.Module):
  """`depth` layers: (Dense -> LN -> GELU) x (depth - 1) -> Dense."""

  def __init__(self, d_in: int, d_out: int, *, hidden: int, depth: int, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    widths = [d_in] + [hidden] * (depth - 1) + [d_out]
    self.dense = nnx.List([layers.Dense(a, b, axes=('embed', 'mlp') if i < depth - 1 else
                                        ('mlp', 'embed') if depth > 1 else ('embed', 'embed'),
                                        **kw)
                           for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))])
    self.norms = nnx.List([layers.LayerNorm(hidden, **kw) for _ in range(depth - 1)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for dense, norm in zip(self.dense[:-1], self.norms):
      x = layers.gelu(norm(dense(x)))
    return self.dense[-1](x)


class S2T(nnx.Module):
  """Student {x, V} -> the teacher's {x_t, V_t}: V bilinearly resized to the teacher grid."""

  def __init__(self, d_student: int, d_teacher: int, grid: tuple[int, int], *, hidden: int,
               depth: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(hidden=hidden, depth=depth, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.global_head = MlpHead(d_student, d_teacher, **kw)
    self.patch_head = MlpHead(d_student, d_teacher, **kw)
    self.grid = tuple(grid)

  def __call__(self, x: jax.Array, patches: jax.Array) -> dict:
    patches = layers.resize_images(patches, self.grid)
    return {'cls': self.global_head(x), 'patches': self.patch_head(patches)}


class Unifier(nnx.Module):
  """One s2t head per teacher alias. `teacher_shapes`: alias -> (width, (grid_h, grid_w))."""

  def __init__(self, d_student: int, teacher_shapes: dict, *, hidden: int, depth: int,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.s2t = nnx.Dict({
        alias: S2T(d_student, width, grid, hidden=hidden, depth=depth, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
        for alias, (width, grid) in sorted(teacher_shapes.items())})

  def __call__(self, student: dict) -> dict:
    return {alias: head(student['cls'], student['patches']) for alias, head in self.s2t.items()}
