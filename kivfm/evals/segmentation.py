"""Segmentation metrics: binary / per-class IoU, box and mask IoU (COCO AP: `kivfm.evals.coco`).

Conventions
- Masks: bool arrays are used as is; any other dtype is binarised with `x > threshold`.
- binary IoU of two empty masks (empty union) is `empty_value` (default 1.0: nothing to find,
  nothing found); pass np.nan to drop such images from `mean_binary_iou`.
- Boxes are [..., 4] corner boxes (lo0, lo1, hi0, hi1): (x1, y1, x2, y2) or (y1, x1, y2, x2),
  as long as both sides use the same order. Continuous coordinates: area = (hi0-lo0)*(hi1-lo1),
  no +1. Pairs with an empty union have IoU 0.
"""
from __future__ import annotations

import numpy as np



def _binary(mask, threshold: float) -> np.ndarray:
  m = np.asarray(mask)
  return m if m.dtype == np.bool_ else m > threshold


# ----------------------------------------------------------------------------- binary masks


def binary_iou(pred_mask, true_mask, *, threshold: float = 0.5,
               empty_value: float = 1.0) -> np.ndarray | float:
  """IoU per image of [..., H, W] masks: an array of shape [...] (a float for one [H, W] map)."""
  p, t = _binary(pred_mask, threshold), _binary(true_mask, threshold)
  if p.shape != t.shape or p.ndim < 2:
    raise ValueError(f'mask shapes differ or are not [..., H, W]: {p.shape} vs {t.shape}')
  inter = np.logical_and(p, t).sum(axis=(-2, -1), dtype=np.int64)
  union = np.logical_or(p, t).sum(axis=(-2, -1), dtype=np.int64)
  iou = np.where(union > 0, inter / np.maximum(union, 1), empty_value)
  return float(iou) if iou.ndim == 0 else iou


def mean_binary_iou(pred_mask, true_mask, *, threshold: float = 0.5,
                    empty_value: float = 1.0) -> float:
  """Mean of `binary_iou` over images (nan entries, e.g. empty_value=nan, are skipped)."""
  return float(np.nanmean(binary_iou(pred_mask, true_mask, threshold=threshold,
                                     empty_value=empty_value)))


# ------------------------------------------------------------------------------ label maps


def confusion_matrix(pred_labels, true_labels, num_classes: int,
                     ignore_index: int | None = 255) -> np.ndarray:
  """[num_classes, num_classes] int64 counts, rows = true class, columns = predicted class.

  Pixels whose true label is `ignore_index` are skipped; any other label outside
  [0, num_classes) raises. Sum matrices over images to accumulate a dataset.
  """
  p, t = np.asarray(pred_labels).ravel(), np.asarray(true_labels).ravel()
  if p.shape != t.shape:
    raise ValueError(f'label maps differ in size: {np.shape(pred_labels)} vs '
                     f'{np.shape(true_labels)}')
  if ignore_index is not None:
    keep = t != ignore_index
    p, t = p[keep], t[keep]
  for name, x in (('pred', p), ('true', t)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f'{name} labels outside [0, {num_classes}) (and not ignore_index)')
  flat = t.astype(np.int64) * num_classes + p.astype(np.int64)
  return np.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion) -> np.ndarray:
  """Per-class IoU [C] = TP / (TP + FP + FN); nan for classes absent from both sides."""
  cm = np.asarray(confusion, np.float64)
  tp = np.diag(cm)
  union = cm.sum(axis=0) + cm.sum(axis=1) - tp
  return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(pred_labels, true_labels, num_classes: int, ignore_index: int | None = 255, *,
             return_per_class: bool = False):
  """Mean IoU over classes present in the prediction or the ground truth (absent ones excluded).

  Pixels are pooled over everything given (pass a batch [B, H, W] for dataset mIoU). With
  `return_per_class`, returns (miou, per-class IoU [C] with nan for excluded classes).
  """
  per_class = iou_from_confusion(confusion_matrix(pred_labels, true_labels, num_classes,
                                                  ignore_index))
  miou = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float('nan')
  return (miou, per_class) if return_per_class else miou


# ----------------------------------------------------------------------- pairwise box / mask IoU


def box_iou(boxes_a, boxes_b) -> np.ndarray:
  """Pairwise IoU [N, M] of corner boxes [N, 4] and [M, 4] (float64)."""
  a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
  b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
  area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
  area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def mask_iou(masks_a, masks_b, *, threshold: float = 0.5) -> np.ndarray:
  """Pairwise IoU [N, M] of masks [N, H, W] and [M, H, W] (exact integer counts)."""
  a = _binary(masks_a, threshold)
  b = _binary(masks_b, threshold)
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'mask sizes differ: {np.shape(masks_a)} vs {np.shape(masks_b)}')
  # float64 matmul is exact for counts < 2**53.
  inter = a.astype(np.float64) @ b.astype(np.float64).T
  union = a.sum(axis=1)[:, None] + b.sum(axis=1)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
