"""The embedded offline demo, shortened, end to end through kivfm.main; bad data in training."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kivfm import config as config_lib, metrics, train

FASHION = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'


@pytest.mark.skipif(not os.path.exists(FASHION),
                    reason='needs apt-get install -y dataset-fashion-mnist')
def test_short_demo_produces_the_full_report(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'kivfm.main', '--config=configs/demo.py:short',
       f'--workdir={tmp_path}', '--config.progress=none',
       f'--config.data.tfds_data_dir={tmp_path / "tfds"}'],
      capture_output=True, text=True, timeout=1200,
      env={**os.environ, 'XLA_FLAGS': ''})   # one CPU device, as a user's machine runs it
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / 'eval' / 'report.json').read_text())
  assert set(report['probes']) == {'student', 'dino', 'effnet', 'raw_pixels'}
  for accuracies in report['probes'].values():
    assert 0.0 <= accuracies['knn'] <= 1.0 and 0.0 <= accuracies['linear'] <= 1.0
  assert report['probe_sizes'] == {'train': 100, 'test': 50}
  assert set(report['heads']) == {'top1_agreement/effnet', 'saliency_iou/dino'}
  for alias in ('dino', 'effnet'):
    fid = report['fidelity'][alias]
    assert set(fid) == {'before', 'after'} and set(fid['after']) == {'patches', 'cls'}
  # Training moves the student toward every teacher.
  assert report['fidelity']['dino']['after']['patches'] > report['fidelity']['dino'][
      'before']['patches']
  assert (tmp_path / 'eval' / 'curves.png').stat().st_size > 10_000
  assert 'raw_pixels' in proc.stdout and 'saliency_iou/dino' in proc.stdout


def test_corrupt_images_are_skipped_counted_and_training_finishes(tmp_path):
  rng = np.random.default_rng(0)
  for label in ('a', 'b'):
    folder = tmp_path / 'images' / label
    folder.mkdir(parents=True)
    for i in range(12):
      Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / 'grey.png')
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(folder / 'rgba.png')
    (folder / 'truncated.png').write_bytes((folder / '0.png').read_bytes()[:100])
    (folder / 'garbage.jpg').write_bytes(b'not an image at all')
  config = config_lib.load('configs/base.py:smoke')
  config.data.update(source='folder', folder=str(tmp_path / 'images'))
  config.total_steps = 8
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  records = metrics.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, 9))
  assert sum(r['data/skipped'] for r in records) >= 4   # 8 steps x 8 images > 1 epoch of 28
  assert all(np.isfinite(r['loss']) for r in records)
