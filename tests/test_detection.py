"""The detection evaluator: targets by hand, decoding of ideal head outputs gives AP 1, the head
learns; COCO-format sources (RLE and polygons as pycocotools decodes them)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from kivfm import config as config_lib
from kivfm.data import instances, offline, pasted
from kivfm.evals import coco, detection

needs_fashion = pytest.mark.skipif(not os.path.isdir(offline.FASHION_MNIST_DIR),
                                   reason=f'needs {offline.FASHION_MNIST_PACKAGE}')


def record(boxes, classes, size):
  masks = np.zeros((len(boxes), size, size), bool)
  for mask, (y0, x0, y1, x1) in zip(masks, np.asarray(boxes, int)):
    mask[y0:y1, x0:x1] = True
  return {'boxes': np.asarray(boxes, np.float32), 'classes': np.asarray(classes),
          'masks': masks, 'label': np.zeros((size, size), np.int32)}


def test_targets_by_hand():
  """A 20 x 20 px box at (10, 20) in a 40 px image, grid 10 (stride 4): centre (5, 7.5) cells
  -> cell (5, 7), offset (0, 0.5), size (5, 5); the mask covers cells 3..7 x 5..9 (the box
  spans 2.5..7.5 x 5..10)."""
  t = detection.targets([record([[10, 20, 30, 40]], [3], 40)], grid=10, num_classes=4,
                        max_objects=2)
  assert t['heatmap'].shape == (1, 10, 10, 4)
  assert t['heatmap'][0, 5, 7, 2] == 1 and (t['heatmap'][..., [0, 1, 3]] == 0).all()
  assert (t['heatmap'] == 1).sum() == 1
  assert t['index'][0, 0] == 57 and t['valid'].tolist() == [[1, 0]]
  np.testing.assert_allclose(t['box'][0, 0], [0, 0.5, 5, 5])
  covered = np.zeros((10, 10))
  covered[3:7, 5:10] = 1
  covered[2, 5:10] = covered[7, 5:10] = 0.5
  np.testing.assert_allclose(t['masks'][0, 0], covered)


def ideal_outputs(records, size):
  """Head outputs that encode the ground truth exactly: a heatmap peak per object, its offset
  and size, and one prototype per object holding its mask (coefficients pick it)."""
  t = detection.targets(records, size, 4, 2)
  logit = lambda p: np.log(p / (1 - p))
  coefficients = np.zeros((len(records), size, size, 2), np.float32)
  box = np.zeros((len(records), size * size, 4), np.float32)
  for i in range(len(records)):
    for k in range(int(t['valid'][i].sum())):
      coefficients[i].reshape(-1, 2)[t['index'][i, k], k] = 1
      box[i, t['index'][i, k]] = t['box'][i, k]
  return {'heatmap': jnp.asarray(np.where(t['heatmap'] == 1, logit(0.99), logit(0.01))),
          'box': jnp.asarray(box.reshape(len(records), size, size, 4)),
          'coefficients': jnp.asarray(coefficients),
          'prototypes': jnp.asarray(np.moveaxis(np.where(t['masks'] > 0.5, 20.0, -20.0), 1, -1))}


def test_ideal_head_outputs_decode_to_the_ground_truth():
  records = [record([[2, 3, 12, 9], [14, 14, 30, 28]], [1, 4], 32),
             record([[0, 0, 32, 16]], [2], 32)]
  boxes, scores, classes, masks = detection.decode(ideal_outputs(records, 32), top=5, size=32)
  detections = [{'boxes': b, 'scores': s, 'classes': c, 'masks': m}
                for b, s, c, m in zip(boxes, scores, classes, masks)]
  np.testing.assert_allclose(boxes[0, :2], records[0]['boxes'], atol=1e-5)
  assert classes[0, :2].tolist() == [1, 4]
  for kind in ('box', 'mask'):
    assert coco.evaluate(detections, records, kind=kind)['AP'] == pytest.approx(1.0)


@needs_fashion
def test_the_head_learns_on_pasted_objects():
  records = [pasted.PastedObjects(8, 'train', size=32)[i] for i in range(8)]
  features = np.stack([r['image'] for r in records]).astype(np.float32)
  features = features.reshape(8, 8, 4, 8, 4, 3).mean(axis=(2, 4)) / 255   # an 8 x 8 grid
  t = detection.targets(records, 32, pasted.NUM_CLASSES - 1, 4)
  options = config_lib.evaluator('detection', width=16, steps=1, batch_size=8)
  _, first = detection.fit(features, t, pasted.NUM_CLASSES - 1, options)
  options = config_lib.evaluator('detection', width=16, steps=60, batch_size=8)
  _, last = detection.fit(features, t, pasted.NUM_CLASSES - 1, options)
  assert last < 0.5 * first


# ---------------------------------------------------------------------- COCO-format sources


def test_rle_and_polygons_decode_like_pycocotools():
  mask_utils = pytest.importorskip('pycocotools.mask')
  rng = np.random.default_rng(0)
  mask = np.zeros((37, 53), np.uint8)
  mask[5:30, 10:40] = rng.random((25, 30)) > 0.3            # many runs, long and short
  encoded = mask_utils.encode(np.asfortranarray(mask))
  compressed = {'size': encoded['size'], 'counts': encoded['counts'].decode()}
  np.testing.assert_array_equal(instances.rle_mask(compressed), mask.astype(bool))
  runs = instances.rle_counts(compressed['counts'])
  np.testing.assert_array_equal(instances.rle_mask({'size': [37, 53], 'counts': runs}), mask)
  square = [[20, 0, 40, 0, 40, 20, 20, 20]]
  want = mask_utils.decode(mask_utils.frPyObjects(square, 37, 53))[..., 0].astype(bool)
  np.testing.assert_array_equal(instances.polygon_mask(square, 37, 53), want)
  polygon = [[10.0, 5.0, 45.0, 8.0, 40.0, 33.0, 12.0, 28.0]]
  want = mask_utils.decode(mask_utils.frPyObjects(polygon, 37, 53))[..., 0].astype(bool)
  got = instances.polygon_mask(polygon, 37, 53)
  assert (got & want).sum() / (got | want).sum() > 0.99     # rasterisers differ at the edge


def test_coco_json_records(tmp_path):
  """A 40 x 60 image: the centred 40 x 40 square (columns 10..49) resized to 20 px. A polygon
  rectangle at columns 20..39, rows 0..19 -> box (0, 5, 10, 15) at 20 px; an object outside the
  square is dropped; crowd annotations are skipped; classes follow sorted category ids."""
  (tmp_path / 'images').mkdir()
  Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / 'images' / 'a.png')
  rectangle = [[20, 0, 40, 0, 40, 20, 20, 20]]
  outside = {'size': [40, 60], 'counts': [40 * 55, 40 * 5]}      # the last 5 columns
  annotations = {
      'images': [{'id': 7, 'file_name': 'a.png', 'height': 40, 'width': 60}],
      'categories': [{'id': 90, 'name': 'b'}, {'id': 3, 'name': 'a'}],
      'annotations': [
          {'id': 1, 'image_id': 7, 'category_id': 90, 'segmentation': rectangle, 'iscrowd': 0},
          {'id': 2, 'image_id': 7, 'category_id': 3, 'segmentation': outside, 'iscrowd': 0},
          {'id': 3, 'image_id': 7, 'category_id': 3, 'segmentation': rectangle, 'iscrowd': 1}]}
  (tmp_path / 'ann.json').write_text(json.dumps(annotations))
  records, classes = instances.open_instances(
      f'coco:{tmp_path / "ann.json"}:{tmp_path / "images"}', 0, 20, config_lib.defaults().data)
  assert classes == 2 and len(records) == 1
  r = records[0]
  assert r['image'].shape == (20, 20, 3) and r['classes'].tolist() == [2]
  np.testing.assert_allclose(r['boxes'], [[0, 5, 10, 15]], atol=1)
  assert (r['label'][r['masks'][0]] == 2).all() and r['label'].sum() == 2 * r['masks'][0].sum()
  with pytest.raises(config_lib.ConfigError, match="instance source 'coco:x'"):
    instances.open_instances('coco:x', 0, 20, config_lib.defaults().data)
