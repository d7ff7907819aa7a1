"""Latent unifier: per-teacher normalisers, student-to-teacher (s2t) heads, shared latent space.

For teacher t with features {x_t, V_t} (width D_t, grid h_t x w_t):
  targets   n_t = N_t(x_t), N_t(V_t)             per-teacher normaliser (none / zscore /
                                                 ema_zscore / phi_s), separately for x and V
  s2t       p_t = MLP(x), MLP(resize(V))         predicts n_t; N_t^-1(p_t) feeds t's own head
  shared    z_t = LN(E_t(n_t))                   teacher code in the shared space (width D_s)
            z_s = LN(S(x)), LN(S(resize(V)))     one student code, aligned with EVERY z_t
            r_t = R_t(z_t)                       reconstruction of n_t from the code
LN has no affine, so every code has unit scale per token and each teacher contributes on the
same scale whatever its feature magnitude.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm.models import layers, normalizers


class MlpHead(nnx.Module):
  """`depth` layers: (Dense -> LN -> GELU) x (depth - 1) -> Dense."""

  def __init__(self, d_in: int, d_out: int, *, hidden: int, depth: int, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    widths = [d_in] + [hidden] * (depth - 1) + [d_out]
    axes = [('embed', 'mlp')] * (depth - 1) + [('mlp', 'embed') if depth > 1 else ('embed', None)]
    self.dense = nnx.List([layers.Dense(a, b, axes=ax, **kw)
                           for a, b, ax in zip(widths[:-1], widths[1:], axes)])
    self.norms = nnx.List([layers.LayerNorm(hidden, **kw) for _ in range(depth - 1)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for dense, norm in zip(self.dense[:-1], self.norms):
      x = layers.gelu(norm(dense(x)))
    return self.dense[-1](x)


class S2T(nnx.Module):
  """Student {x, V} -> the teacher's (normalised) {x_t, V_t}; V resized to the teacher grid."""

  def __init__(self, d_student: int, d_teacher: int, grid: tuple[int, int], *, hidden: int,
               depth: int, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(hidden=hidden, depth=depth, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.global_head = MlpHead(d_student, d_teacher, **kw)
    self.patch_head = MlpHead(d_student, d_teacher, **kw)
    self.grid = tuple(grid)

  def __call__(self, x: jax.Array, patches: jax.Array) -> dict:
    patches = layers.resize_images(patches, self.grid)
    return {'cls': self.global_head(x), 'patches': self.patch_head(patches)}


class TeacherNorm(nnx.Module):
  """The normalisers of one teacher's global vector and patch map."""

  def __init__(self, kind: str, width: int, *, momentum: float):
    kw = {'momentum': momentum} if kind == 'ema_zscore' else {}
    self.cls = normalizers.make(kind, width, **kw)
    self.patches = normalizers.make(kind, width, **kw)
    self.kind = kind

  def update(self, features: dict) -> None:
    """EMA statistics follow the batch; fixed statistics do not move."""
    if self.kind == 'ema_zscore':
      self.cls.update(features['cls'])
      self.patches.update(features['patches'])

  def __call__(self, features: dict) -> dict:
    return {'cls': self.cls(features['cls']), 'patches': self.patches(features['patches'])}

  def inverse(self, features: dict) -> dict:
    return {'cls': self.cls.inverse(features['cls']),
            'patches': self.patches.inverse(features['patches'])}


def _code(x: jax.Array) -> jax.Array:
  """Unit-scale code per token: LayerNorm without affine, float32."""
  x = x.astype(jnp.float32)
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + 1e-6)


class Unifier(nnx.Module):
  """All per-teacher parts. `teacher_shapes`: alias -> (width, (grid_h, grid_w)).

  shared_dim = 0 gives the teacher-space-only baseline (no shared space).
  """

  def __init__(self, d_student: int, teacher_shapes: dict, *, hidden: int, depth: int,
               shared_dim: int = 0, normalizer: str = 'none', momentum: float = 0.99,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    shapes = sorted(teacher_shapes.items())
    self.s2t = nnx.Dict({a: S2T(d_student, w, g, hidden=hidden, depth=depth, **kw)
                         for a, (w, g) in shapes})
    self.norm = nnx.Dict({a: TeacherNorm(normalizer, w, momentum=momentum) for a, (w, _) in shapes})
    self.grids = {a: tuple(g) for a, (_, g) in shapes}
    self.shared_dim = shared_dim
    if shared_dim:
      self.student_proj = layers.Dense(d_student, shared_dim, axes=('embed', None), **kw)
      self.encode = nnx.Dict({a: layers.Dense(w, shared_dim, axes=('embed', None), **kw)
                              for a, (w, _) in shapes})
      self.decode = nnx.Dict({a: layers.Dense(shared_dim, w, axes=(None, 'embed'), **kw)
                              for a, (w, _) in shapes})

  def update_stats(self, targets: dict) -> None:
    for alias, norm in self.norm.items():
      norm.update(targets[alias])

  def normalize(self, targets: dict) -> dict:
    return {alias: self.norm[alias](targets[alias]) for alias in self.norm}

  def __call__(self, student: dict) -> dict:
    """Per-teacher s2t predictions, in each teacher's normalised space."""
    return {alias: head(student['cls'], student['patches']) for alias, head in self.s2t.items()}

  def to_teacher_space(self, alias: str, prediction: dict) -> dict:
    """Undo the normaliser: what teacher `alias` itself would output."""
    return self.norm[alias].inverse(prediction)

  def shared(self, student: dict, normalized_targets: dict) -> dict:
    """alias -> {'student': z_s, 'teacher': z_t, 'recon': R_t(z_t), 'target': n_t}, each a
    {'cls', 'patches'} pair; the student code is computed on each teacher's grid."""
    out = {}
    for alias, target in normalized_targets.items():
      patches = layers.resize_images(student['patches'], self.grids[alias])
      z_s = {'cls': _code(self.student_proj(student['cls'])),
             'patches': _code(self.student_proj(patches))}
      z_t = {k: _code(self.encode[alias](v)) for k, v in target.items()}
      recon = {k: self.decode[alias](v) for k, v in z_t.items()}
      out[alias] = {'student': z_s, 'teacher': z_t, 'recon': recon, 'target': target}
    return out
