"""How closely predicted features match target features ([..., C] arrays, e.g. student ->
teacher adaptor outputs vs teacher tokens). Computed in float64."""
from __future__ import annotations

import numpy as np


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
  p, t = np.asarray(pred), np.asarray(target)
  if p.shape != t.shape or p.ndim < 1:
    raise ValueError(f'shapes differ or are scalar: {p.shape} vs {t.shape}')
  return p, t


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.einsum('...c,...c->...', a, b, dtype=np.float64)


def token_cosine(pred, target, *, eps: float = 1e-12) -> np.ndarray:
  """Cosine similarity along the last axis, shape [...]; 0 where either vector is (near) zero."""
  p, t = _pair(pred, target)
  denom = np.sqrt(_dot(p, p)) * np.sqrt(_dot(t, t))
  return _dot(p, t) / np.maximum(denom, eps)


def cosine_fidelity(pred, target, *, eps: float = 1e-12) -> float:
  """Mean over all tokens (every leading index) of the cosine along the last axis."""
  return float(np.mean(token_cosine(pred, target, eps=eps)))


def relative_error(pred, target, *, per_token: bool = False, eps: float = 1e-12) -> float:
  """||pred - target|| / ||target||: over the whole array (Frobenius), or with `per_token` the
  mean over tokens of the ratio along the last axis. The denominator is clamped at `eps`."""
  p, t = _pair(pred, target)
  diff = np.asarray(p, np.float64) - np.asarray(t, np.float64)
  if per_token:
    num, den = np.sqrt(_dot(diff, diff)), np.sqrt(_dot(t, t))
    return float(np.mean(num / np.maximum(den, eps)))
  return float(np.sqrt(_dot(diff.ravel(), diff.ravel())) /
               max(float(np.sqrt(_dot(t.ravel(), t.ravel()))), eps))
