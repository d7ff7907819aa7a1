"""Distances between student predictions and teacher features, and per-teacher loss assembly."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _cosine_distance(pred, target):
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  eps = 1e-6
  cos = (pred * target).sum(-1) / (
      jnp.maximum(jnp.linalg.norm(pred, axis=-1), eps) *
      jnp.maximum(jnp.linalg.norm(target, axis=-1), eps))
  return (1.0 - cos).mean()


def _smooth_l1(pred, target, beta: float = 1.0):
  diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).mean()


def _mse(pred, target):
  return jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)).mean()


def distance(name: str, pred: jax.Array, target: jax.Array, cos_weight: float = 0.9) -> jax.Array:
  """Mean over tokens of a per-token distance on the last axis.

  cosine: 1 - cos; smooth_l1 / mse: elementwise, averaged over channels too;
  cos_smooth_l1: cos_weight * (1 - cos) + (1 - cos_weight) * smooth_l1 (AM-RADIO / Theia).
  """
  if pred.shape != target.shape:
    raise ValueError(f'prediction {pred.shape} and target {target.shape} differ in shape')
  if name == 'cosine':
    return _cosine_distance(pred, target)
  if name == 'smooth_l1':
    return _smooth_l1(pred, target)
  if name == 'mse':
    return _mse(pred, target)
  if name == 'cos_smooth_l1':
    return (cos_weight * _cosine_distance(pred, target) +
            (1.0 - cos_weight) * _smooth_l1(pred, target))
  raise ValueError(f'unknown distance {name!r}; allowed: cosine, smooth_l1, mse, cos_smooth_l1')


def teacher_space_losses(pred: dict, targets: dict, weights: dict, loss_cfg) -> tuple:
  """Per-teacher losses in each teacher's own space.

  pred / targets: alias -> {'cls': [B, D_t], 'patches': [B, h, w, D_t]}; weights: alias -> w_t.
  Returns (total = sum_t w_t * loss_t, {alias: loss_t}).
  """
  per_teacher = {}
  for alias in sorted(targets):
    p, t = pred[alias], targets[alias]
    per_teacher[alias] = (
        loss_cfg.global_weight * distance(loss_cfg.global_, p['cls'], t['cls'],
                                          loss_cfg.cos_weight) +
        loss_cfg.patch_weight * distance(loss_cfg.patch, p['patches'], t['patches'],
                                         loss_cfg.cos_weight))
  total = sum(weights[a] * per_teacher[a] for a in per_teacher)
  return total, per_teacher
