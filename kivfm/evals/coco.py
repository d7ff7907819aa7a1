"""COCO detection / instance-segmentation metrics, computed as `pycocotools.COCOeval` computes
them (tests compare the two on the same predictions), without its file formats.

Per image and class: detections sorted by score (stable), at most `max_detections` kept; at each
IoU threshold every detection, in order, takes the still-unmatched ground truth with the
highest IoU >= the threshold (among equal IoUs the later one; ground truth outside the area
range is ignored and tried last: a detection matched to it is ignored, as is an unmatched
detection outside the area range). Ground-truth areas: 'areas' if given, else the masks' pixel
counts, else the boxes' (COCO sizes box AP by the mask area). Over all images: precision made
monotone and read at 101 recall points (0 beyond the highest recall). AP = the mean over classes with ground truth in
the range, recall points and thresholds. Detection areas: a mask's pixel count, or w * h.
"""
from __future__ import annotations

import numpy as np

from kivfm.evals.segmentation import box_iou, mask_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)        # the same floats as pycocotools
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
AREA_RANGES = {'all': (0, 1e10), 'small': (0, 32 ** 2), 'medium': (32 ** 2, 96 ** 2),
               'large': (96 ** 2, 1e10)}


def areas(items: np.ndarray, kind: str) -> np.ndarray:
  """Pixel counts of masks [N, H, W], or w * h of (y0, x0, y1, x1) boxes [N, 4]."""
  items = np.asarray(items)
  if len(items) == 0:
    return np.zeros(0)
  if kind == 'mask':
    return items.reshape(len(items), -1).sum(axis=1).astype(np.float64)
  return ((items[:, 2] - items[:, 0]) * (items[:, 3] - items[:, 1])).astype(np.float64)


def _gt_areas(gt: dict, selected: np.ndarray) -> np.ndarray:
  """Ground-truth areas as COCO defines them: given ('areas'), else the mask's, else the box's
  (so box AP's size ranges follow the masks when there are masks, as in COCO)."""
  if 'areas' in gt:
    return np.asarray(gt['areas'], np.float64)[selected]
  kind = 'mask' if 'masks' in gt else 'box'
  return areas(np.asarray(gt['masks' if kind == 'mask' else 'boxes'])[selected], kind)


def _match_image(ious, gt_ignore, det_area_out, thresholds):
  """(matched [T, D], ignored [T, D]) for one image and class; ious [D, G] in score order."""
  num_t, (num_d, num_g) = len(thresholds), ious.shape
  order = np.argsort(gt_ignore, kind='stable')          # ground truth in range first
  ious, gt_ignore = ious[:, order], gt_ignore[order]
  matched = np.zeros((num_t, num_d), bool)
  ignored = np.zeros((num_t, num_d), bool)
  for t, threshold in enumerate(thresholds):
    taken = np.zeros(num_g, bool)
    for d in range(num_d):
      best, m = min(threshold, 1 - 1e-10), -1
      for g in range(num_g):
        if taken[g]:
          continue
        if m > -1 and not gt_ignore[m] and gt_ignore[g]:
          break
        if ious[d, g] < best:
          continue
        best, m = ious[d, g], g
      if m > -1:
        matched[t, d], ignored[t, d], taken[m] = True, gt_ignore[m], True
  ignored |= ~matched & det_area_out[None, :]
  return matched, ignored


def _precision_at_recall_points(tp: np.ndarray, fp: np.ndarray, num_gt: int) -> np.ndarray:
  tp, fp = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
  recall = tp / num_gt
  precision = tp / (tp + fp + np.spacing(1))
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  idx = np.searchsorted(recall, RECALL_POINTS, side='left')
  return np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)


def evaluate(detections: list[dict], ground_truth: list[dict], *, kind: str = 'box',
             max_detections: int = 100) -> dict:
  """AP, AP50, AP75, AP_small, AP_medium, AP_large (floats in [0, 1]; nan without ground truth).

  detections[i]: {'boxes' [D, 4] or 'masks' [D, H, W], 'scores' [D], 'classes' [D]} of image
  i; ground_truth[i]: {'boxes' or 'masks', 'classes' [G]}. kind: 'box' or 'mask'.
  """
  if kind not in ('box', 'mask'):
    raise ValueError(f"kind must be 'box' or 'mask', got {kind!r}")
  if len(detections) != len(ground_truth):
    raise ValueError(f'{len(detections)} images of detections, {len(ground_truth)} of ground truth')
  key, iou_fn = ('boxes', box_iou) if kind == 'box' else ('masks', mask_iou)
  thresholds = IOU_THRESHOLDS
  classes = np.unique(np.concatenate([np.asarray(g['classes']).reshape(-1)
                                      for g in ground_truth] or [np.zeros(0, int)]))
  # precision[area][class] -> [T, R], or None without ground truth in that range
  curves = {name: [] for name in AREA_RANGES}
  for c in classes:
    per_image = []
    for det, gt in zip(detections, ground_truth):
      keep = np.flatnonzero(np.asarray(det['classes']).reshape(-1) == c)
      scores = np.asarray(det['scores'], np.float64).reshape(-1)[keep]
      order = np.argsort(-scores, kind='stable')[:max_detections]
      d_items = np.asarray(det[key])[keep][order]
      is_c = np.asarray(gt['classes']).reshape(-1) == c
      g_items = np.asarray(gt[key])[is_c]
      ious = (iou_fn(d_items, g_items) if len(d_items) and len(g_items)
              else np.zeros((len(d_items), len(g_items))))
      per_image.append((scores[order], ious, areas(d_items, kind), _gt_areas(gt, is_c)))
    for name, (lo, hi) in AREA_RANGES.items():
      all_scores, all_tp, all_fp, num_gt = [], [], [], 0
      for scores, ious, d_area, g_area in per_image:
        g_ignore = (g_area < lo) | (g_area > hi)
        matched, ignored = _match_image(ious, g_ignore, (d_area < lo) | (d_area > hi),
                                        thresholds)
        num_gt += int((~g_ignore).sum())
        all_scores.append(scores)
        all_tp.append(matched & ~ignored)
        all_fp.append(~matched & ~ignored)
      if num_gt == 0:
        curves[name].append(None)
        continue
      rank = np.argsort(-np.concatenate(all_scores), kind='mergesort')
      tp, fp = np.concatenate(all_tp, axis=1)[:, rank], np.concatenate(all_fp, axis=1)[:, rank]
      curves[name].append(np.stack([_precision_at_recall_points(tp[t], fp[t], num_gt)
                                    for t in range(len(thresholds))]))

  def mean(name, threshold=None):
    rows = [c if threshold is None else c[[threshold]] for c in curves[name] if c is not None]
    return float(np.mean(rows)) if rows else float('nan')

  return {'AP': mean('all'), 'AP50': mean('all', 0), 'AP75': mean('all', 5),
          'AP_small': mean('small'), 'AP_medium': mean('medium'), 'AP_large': mean('large')}
