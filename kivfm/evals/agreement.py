"""Agreement between two classifiers' logits [..., C] (e.g. student head vs teacher).

Ties inside a row are broken by the lower class index (stable ordering), identically for
both inputs.
"""
from __future__ import annotations

import numpy as np


def _rows(logits_a, logits_b) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(logits_a), np.asarray(logits_b)
  if a.shape != b.shape or a.ndim < 1:
    raise ValueError(f'logits shapes differ or are scalar: {a.shape} vs {b.shape}')
  return a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])


def topk_indices(logits, k: int) -> np.ndarray:
  """Class ids [..., k] in descending logit order; equal logits keep the lower id first."""
  x = np.asarray(logits)
  return np.argsort(-x, axis=-1, kind='stable')[..., :k]


def top1_agreement(logits_a, logits_b) -> float:
  """Fraction of rows whose argmax class is the same in both."""
  a, b = _rows(logits_a, logits_b)
  if a.shape[0] == 0:
    return float('nan')
  return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


def topk_overlap(logits_a, logits_b, k: int = 5) -> float:
  """Mean over rows of |top-k(a) & top-k(b)| / k (order inside the top k is ignored)."""
  a, b = _rows(logits_a, logits_b)
  if not 1 <= k <= a.shape[-1]:
    raise ValueError(f'k must be in [1, {a.shape[-1]}], got {k}')
  if a.shape[0] == 0:
    return float('nan')
  ta, tb = topk_indices(a, k), topk_indices(b, k)
  shared = (ta[:, :, None] == tb[:, None, :]).any(axis=-1).sum(axis=-1)
  return float(np.mean(shared / k))
