"""Segmentation and detection metrics: binary / per-class IoU, box and mask IoU, COCO-style AP.

Conventions
- Masks: bool arrays are used as is; any other dtype is binarised with `x > threshold`.
- binary IoU of two empty masks (empty union) is `empty_value` (default 1.0: nothing to find,
  nothing found); pass np.nan to drop such images from `mean_binary_iou`.
- Boxes are [..., 4] corner boxes (lo0, lo1, hi0, hi1): (x1, y1, x2, y2) or (y1, x1, y2, x2),
  as long as both sides use the same order. Continuous coordinates: area = (hi0-lo0)*(hi1-lo1),
  no +1. Pairs with an empty union have IoU 0.
- AP (COCO): detections of all images are ranked by score (stable sort: ties keep image order,
  then input order), at most `max_detections` per image; at each IoU threshold t a detection is
  matched greedily, in rank order, to the still-unmatched ground truth of its image with the
  highest IoU >= t (equal IoUs: the lower ground-truth index); precision is made monotone and
  read at 101 recall points 0, 0.01, ..., 1 (0 beyond the maximum recall); AP is the mean over
  recall points and thresholds. No crowd / area-range handling. No ground truth -> nan.
"""
from __future__ import annotations

import numpy as np

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # the same floats as pycocotools
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


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


# ------------------------------------------------------------------------ average precision


def _per_image(x) -> list:
  """A list / tuple holds one entry per image; anything else is one image's array."""
  return list(x) if isinstance(x, (list, tuple)) else [x]


def _interpolated_ap(is_tp: np.ndarray, num_gt: int) -> float:
  """101-point AP from rank-ordered true-positive flags."""
  if len(is_tp) == 0:
    return 0.0
  tp = np.cumsum(is_tp, dtype=np.float64)
  fp = np.cumsum(~is_tp, dtype=np.float64)
  recall = tp / num_gt
  precision = tp / np.maximum(tp + fp, np.finfo(np.float64).tiny)
  precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone envelope
  idx = np.searchsorted(recall, RECALL_POINTS, side='left')
  values = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
  return float(values.mean())


def average_precision(pred, scores, gt, *, iou_thresholds=COCO_IOU_THRESHOLDS,
                      kind: str = 'box', max_detections: int | None = 100,
                      return_per_threshold: bool = False):
  """COCO-style AP of one class (see the module docstring for the exact protocol).

  pred / scores / gt: one image's arrays (boxes [D, 4] or masks [D, H, W], scores [D],
  ground truth [G, 4] / [G, H, W]), or lists / tuples of them with one entry per image (so a
  single image must be given as arrays, not nested Python lists).
  kind: 'box' or 'mask'. iou_thresholds: e.g. (0.5,) for AP50; default COCO 0.50:0.05:0.95.
  With `return_per_threshold`, returns (AP, AP per threshold [T]).
  """
  if kind not in ('box', 'mask'):
    raise ValueError(f"kind must be 'box' or 'mask', got {kind!r}")
  iou_fn = box_iou if kind == 'box' else mask_iou
  preds, scores, gts = _per_image(pred), _per_image(scores), _per_image(gt)
  if not len(preds) == len(scores) == len(gts):
    raise ValueError('pred, scores and gt must list the same number of images')
  thresholds = np.minimum(np.asarray(iou_thresholds, np.float64).reshape(-1), 1 - 1e-10)
  num_t = len(thresholds)
  all_scores, all_tp, num_gt = [], [], 0
  for p, s, g in zip(preds, scores, gts):
    s = np.asarray(s, np.float64).reshape(-1)
    p, g = np.asarray(p), np.asarray(g)
    if (len(p) if p.ndim else 0) != len(s):
      raise ValueError(f'{len(s)} scores for {len(p) if p.ndim else 0} detections')
    order = np.argsort(-s, kind='stable')
    if max_detections is not None:
      order = order[:max_detections]
    p = p[order]
    num_g = len(g) if g.ndim else 0
    num_gt += num_g
    tp = np.zeros((len(order), num_t), bool)
    if len(order) and num_g:
      ious = iou_fn(p, g)  # [D, G]
      matched = np.zeros((num_t, num_g), bool)
      for d in range(len(order)):
        cand = np.where(matched | (ious[d][None, :] < thresholds[:, None]), -1.0,
                        ious[d][None, :])  # [T, G]
        best = np.argmax(cand, axis=1)
        hit = cand[np.arange(num_t), best] >= 0
        matched[np.arange(num_t)[hit], best[hit]] = True
        tp[d] = hit
    all_scores.append(s[order])
    all_tp.append(tp)
  if num_gt == 0:
    per_t = np.full(num_t, np.nan)
  else:
    s = np.concatenate(all_scores)
    tp = np.concatenate(all_tp, axis=0)
    rank = np.argsort(-s, kind='stable')
    per_t = np.array([_interpolated_ap(tp[rank, i], num_gt) for i in range(num_t)])
  ap = float(per_t.mean())
  return (ap, per_t) if return_per_threshold else ap


def mean_average_precision(pred, scores, pred_classes, gt, gt_classes, **kwargs) -> float:
  """Mean over classes with ground truth of `average_precision` (COCO's mAP: classes without
  ground truth are excluded). Arguments as in `average_precision`, plus per-detection and
  per-ground-truth class ids (same nesting as `scores`)."""
  preds, scores, gts = _per_image(pred), _per_image(scores), _per_image(gt)
  pcls = [np.asarray(c).reshape(-1) for c in _per_image(pred_classes)]
  gcls = [np.asarray(c).reshape(-1) for c in _per_image(gt_classes)]
  classes = np.unique(np.concatenate(gcls)) if gcls else np.zeros((0,), int)
  aps = []
  for c in classes:
    aps.append(average_precision(
        [np.asarray(p)[pc == c] for p, pc in zip(preds, pcls)],
        [np.asarray(s).reshape(-1)[pc == c] for s, pc in zip(scores, pcls)],
        [np.asarray(g)[gc == c] for g, gc in zip(gts, gcls)], **kwargs))
  return float(np.mean(aps)) if aps else float('nan')
