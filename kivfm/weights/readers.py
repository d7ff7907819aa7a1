"""Weight files -> flat `dict[str, np.ndarray]`: safetensors (also sharded), torch, ONNX and npz;
never runs code from a file. bfloat16 / float8 arrays come back as `ml_dtypes` types (JAX's own).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from kivfm.weights.errors import (PARSE_ERRORS, CorruptWeightFileError, MissingWeightFileError,
                                  existing_file)
from kivfm.weights.torch_pickle import read_torch_restricted

SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U64': np.uint64,
    'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8, 'BOOL': np.bool_, 'C64': np.complex64}
MAX_SAFETENSORS_HEADER = 100 << 20
# Top-level keys under which training checkpoints nest the model's state dict.
STATE_DICT_KEYS = ('state_dict', 'model_state_dict', 'model', 'module', 'net')
# npz entry recording arrays stored as unsigned ints because numpy cannot name their dtype.
NPZ_DTYPES_KEY = '__dtypes__'
# npz entry holding the sha256 of the other entries (`save_npz`), checked by `read_npz`.
NPZ_DIGEST_KEY = '__sha256__'


def path_str(path, sep: str = '/') -> str:
  """A parameter path (an nnx state path, or a jax key path) -> 'student/vit/blocks/0/...'."""
  return sep.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def flatten(tree: Mapping, sep: str = '/') -> dict[str, Any]:
  """Nested dicts (and lists / tuples, keyed by index) -> {'a/b/0': leaf}, in insertion order
  (which `traverse_util.flatten_dict` keeps too, but it does not enter lists)."""
  flat = {}

  def visit(node, path: tuple):
    if isinstance(node, (Mapping, list, tuple)):
      for key, child in (node.items() if isinstance(node, Mapping) else enumerate(node)):
        visit(child, (*path, key))
    else:
      flat[path_str(path, sep)] = node

  visit(tree, ())
  return flat


def unflatten(flat: Mapping[str, Any], sep: str = '/') -> dict[str, Any]:
  """{'a/b': leaf} -> {'a': {'b': leaf}} (the inverse of `flatten` for dicts of str keys)."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split(sep)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f'key {key!r} nests under a leaf')
    if leaf in node:
      raise ValueError(f'key {key!r} is both a leaf and a branch')
    node[leaf] = value
  return tree


# ---------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header size, JSON header, raw little-endian tensor bytes.

def _safetensors_array(name: str, info: dict, data: np.ndarray) -> np.ndarray:
  if info.get('dtype') not in SAFETENSORS_DTYPES:
    raise ValueError(f'tensor {name!r} has unsupported dtype {info.get("dtype")!r}')
  dtype = np.dtype(SAFETENSORS_DTYPES[info['dtype']])
  shape = tuple(info['shape'])
  begin, end = info['data_offsets']
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if not 0 <= begin <= end <= data.size or end - begin != nbytes:
    raise ValueError(f'tensor {name!r} {shape} {info["dtype"]} has data offsets {begin}:{end} '
                     f'in {data.size} bytes of data')
  return data[begin:end].view(dtype).reshape(shape)


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file (writable views into one buffer)."""
  path = existing_file(path)
  try:
    with open(path, 'rb') as file:
      (header_size,) = struct.unpack('<Q', file.read(8))
      if header_size > MAX_SAFETENSORS_HEADER:
        raise ValueError(f'header size {header_size} is implausible')
      header = json.loads(file.read(header_size))
      header.pop('__metadata__', None)
      data = np.empty(path.stat().st_size - 8 - header_size, np.uint8)
      file.readinto(data)
    return {name: _safetensors_array(name, info, data) for name, info in header.items()}
  except PARSE_ERRORS as error:
    raise CorruptWeightFileError(path, f'cannot read safetensors: {error}') from error


# ---------------------------------------------------------------------------------------------
# sharded safetensors: `model.safetensors.index.json` ({'weight_map': {tensor: shard file}})
# with its shards `model-0000k-of-0000n.safetensors` beside it.

SHARD_INDEX_SUFFIX = '.safetensors.index.json'


def is_shard_index(path) -> bool:
  """Whether `path` names a sharded safetensors index (by its name)."""
  return os.fspath(path).lower().endswith(SHARD_INDEX_SUFFIX)


def read_shard_index(path) -> dict[str, str]:
  """The weight_map {tensor name: shard file name} of a `*.safetensors.index.json`."""
  path = existing_file(path)
  try:
    weight_map = json.loads(path.read_bytes())['weight_map']
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f'weight_map is {type(weight_map).__name__} {str(weight_map)[:50]}')
    for shard in weight_map.values():
      if not isinstance(shard, str) or shard in ('', '.', '..') or set(shard) & set('/\\'):
        raise ValueError(f'weight_map names {shard!r}, not a file name beside the index')
  except PARSE_ERRORS as error:  # also json.JSONDecodeError, UnicodeDecodeError
    raise CorruptWeightFileError(
        path, f'not a sharded safetensors index ({type(error).__name__}: {error})') from error
  return weight_map


def shard_paths(index) -> dict[str, Path]:
  """{shard file name: path} of every shard an index lists; MissingWeightFileError if one is
  not beside the index."""
  index = Path(index)
  paths = {name: index.parent / name for name in dict.fromkeys(read_shard_index(index).values())}
  for name, path in paths.items():
    if not path.is_file():
      raise MissingWeightFileError(
          f'{path}: no such weight file: shard {name!r} of {index} (the shards of a sharded '
          'checkpoint must be in the folder of its index)')
  return paths


def read_sharded_safetensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a sharded safetensors checkpoint, given its index, in weight_map order."""
  weight_map = read_shard_index(path)
  shards = {name: read_safetensors(shard) for name, shard in shard_paths(path).items()}
  missing = [f'{name} ({shard})' for name, shard in weight_map.items()
             if name not in shards[shard]]
  if missing:
    raise CorruptWeightFileError(path, f'{len(missing)} tensor(s) of its weight_map are not in '
                                 f'their shard: {", ".join(missing[:5])}')
  return {name: shards[shard][name] for name, shard in weight_map.items()}


# ---------------------------------------------------------------------------------------------
# torch checkpoints

def _torch_to_numpy(tensor) -> np.ndarray:
  import torch
  views = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
           torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
           torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype in views:
    int_dtype, np_dtype = views[tensor.dtype]
    return tensor.view(int_dtype).numpy().view(np_dtype).copy()
  return tensor.numpy().copy()


def _torch_load(path: Path):
  """torch.load(weights_only=True) with tensors as numpy arrays; None if torch fails."""
  import torch
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception:  # any failure: the restricted reader then reports what is wrong.
    return None
  return _map_leaves(obj, lambda x: _torch_to_numpy(x) if isinstance(x, torch.Tensor) else x)


def _map_leaves(obj, fn: Callable):
  if isinstance(obj, dict):
    return {key: _map_leaves(value, fn) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_map_leaves(value, fn) for value in obj)
  return fn(obj)


def state_dict_arrays(obj, source) -> dict[str, np.ndarray]:
  """The flat state dict inside an unpickled checkpoint.

  Rule: while `obj` is a dict that holds no array itself but has one of STATE_DICT_KEYS
  (tried in that order) mapping to a dict, descend into it (so {'state_dict': sd, 'epoch': 3}
  and {'model': sd, 'optimizer': ...} give sd). Then nested dicts / lists are flattened with
  '.' (torch's own separator) and only array leaves are kept (ints, strings, ... are dropped).
  """
  while isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
    inner = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
    if inner is None:
      break
    obj = inner
  arrays = {k: v for k, v in flatten(obj, sep='.').items() if isinstance(v, np.ndarray)}
  if not arrays:
    keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise CorruptWeightFileError(source, f'no tensors found (top level: {keys})')
  return arrays


def read_torch(path, *, use_torch: bool | None = None) -> dict[str, np.ndarray]:
  """The state dict of a PyTorch checkpoint (.pth / .pt / .bin; zip or legacy format).

  `use_torch`: True -> `torch.load(weights_only=True)` when torch is installed; False -> the
  torch-free restricted reader; None (default) -> torch only if the process already imported
  it (importing torch next to JAX costs seconds and can clash with GPU libraries). Whenever
  torch is not used or fails, the restricted reader runs and raises UnsafeCheckpointError /
  CorruptWeightFileError naming the file. See `state_dict_arrays` for nested checkpoints.
  """
  path = existing_file(path)
  if use_torch is None:
    use_torch = 'torch' in sys.modules
  obj = _torch_load(path) if use_torch and importlib.util.find_spec('torch') else None
  if obj is None:
    obj = read_torch_restricted(path)
  return state_dict_arrays(obj, path)


# ---------------------------------------------------------------------------------------------
# ONNX

def load_onnx(path):
  """The onnx.ModelProto of `path` (with external data), CorruptWeightFileError if unreadable."""
  import onnx
  from google.protobuf.message import DecodeError
  path = existing_file(path)
  try:
    model = onnx.load(path)
  except (DecodeError, OSError, *PARSE_ERRORS) as error:
    raise CorruptWeightFileError(path, f'cannot parse ONNX model: {error}') from error
  if not model.graph.node:  # protobuf reads an empty file as an empty model
    raise CorruptWeightFileError(path, 'ONNX model without graph nodes')
  return model


def _onnx_model(model_or_path):
  if isinstance(model_or_path, (str, os.PathLike)):
    return load_onnx(model_or_path)
  return model_or_path


def read_onnx_initializers(model_or_path) -> dict[str, np.ndarray]:
  """Every initializer of an ONNX model (a path or a loaded onnx.ModelProto), by its name."""
  from onnx import numpy_helper
  model = _onnx_model(model_or_path)
  return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def read_onnx_matmul_weights(model_or_path) -> dict[str, np.ndarray]:
  """MatMul weights named by the node that consumes them: {node name: B initializer}.

  Exporters leave Linear weights anonymous (`onnx::MatMul_1966`), already in [in, out]
  layout; the MatMul node's name (`/encoder/layer.0/attention/attention/query/MatMul`) says
  which layer they belong to. Nodes without a name are keyed by their output.
  """
  from onnx import numpy_helper
  model = _onnx_model(model_or_path)
  inits = {init.name: init for init in model.graph.initializer}
  return {node.name or node.output[0]: numpy_helper.to_array(inits[node.input[1]])
          for node in model.graph.node
          if node.op_type == 'MatMul' and len(node.input) == 2 and node.input[1] in inits}


# ---------------------------------------------------------------------------------------------
# npz: the fast cache of converted parameters.

def _npz_digest(arrays: Mapping[str, np.ndarray]) -> str:
  """sha256 over every array's key, dtype, shape and bytes (key order independent)."""
  digest = hashlib.sha256()
  for key in sorted(arrays):
    value = np.ascontiguousarray(arrays[key])
    digest.update(f'{key}\0{value.dtype.str}\0{value.shape}\0'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def save_npz(path, flat: Mapping[str, np.ndarray]) -> None:
  """Writes arrays (keys may contain '/') with a content checksum, atomically: the file appears
  whole or not at all, also when several processes write it at once. ml_dtypes arrays survive
  the round trip."""
  path = Path(path)
  arrays, dtypes = {}, {}
  for key, value in flat.items():
    value = np.asarray(value)
    if value.dtype.type.__module__.startswith('ml_dtypes'):
      dtypes[key] = value.dtype.name
      value = value.view(f'u{value.dtype.itemsize}')
    arrays[key] = value
  for reserved in (NPZ_DTYPES_KEY, NPZ_DIGEST_KEY):
    if reserved in arrays:
      raise ValueError(f'{reserved!r} is reserved')
  arrays[NPZ_DTYPES_KEY] = np.array(json.dumps(dtypes))
  arrays[NPZ_DIGEST_KEY] = np.array(_npz_digest(arrays))
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f'.{path.name}.', suffix='.partial',
                                   delete=False) as file:
    partial = Path(file.name)
    try:
      np.savez(file, **arrays)
    except BaseException:
      partial.unlink(missing_ok=True)
      raise
  os.replace(partial, path)


def read_npz(path) -> dict[str, np.ndarray]:
  """Arrays written by `save_npz` (or any npz without object arrays; never unpickles). A file
  written by `save_npz` is checked against its content checksum: CorruptWeightFileError if any
  byte changed."""
  path = existing_file(path)
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {key: npz[key] for key in npz.files}
    expected = arrays.pop(NPZ_DIGEST_KEY, None)
    if expected is not None and str(expected) != _npz_digest(arrays):
      raise CorruptWeightFileError(path, 'content checksum mismatch (the file was modified or '
                                   'damaged after it was written)')
    dtypes = json.loads(str(arrays.pop(NPZ_DTYPES_KEY, '{}')))
    for key, name in dtypes.items():
      arrays[key] = arrays[key].view(getattr(ml_dtypes, name))
    return arrays
  except (*PARSE_ERRORS, OSError) as error:
    raise CorruptWeightFileError(path, f'cannot read npz: {error}') from error


# ---------------------------------------------------------------------------------------------

# By how the file name ends (case-insensitive).
READERS: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    '.safetensors': read_safetensors, SHARD_INDEX_SUFFIX: read_sharded_safetensors,
    '.pth': read_torch, '.pt': read_torch, '.bin': read_torch, '.ckpt': read_torch,
    '.onnx': read_onnx_initializers, '.npz': read_npz}


def _sniff_reader(path: Path) -> Callable[[Path], dict[str, np.ndarray]]:
  with open(path, 'rb') as file:
    head = file.read(9)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      is_npz = any(name.endswith('.npy') for name in archive.namelist())
    return read_npz if is_npz else read_torch
  if head[:1] == b'\x80':  # a pickle protocol >= 2 opcode: legacy torch checkpoint.
    return read_torch
  if head[8:9] == b'{':  # safetensors: header size, then the JSON header.
    return read_safetensors
  raise CorruptWeightFileError(
      path, 'unrecognised format (expected safetensors, torch, ONNX or npz; name it with its '
      f'extension: {", ".join(READERS)})')


def read(path) -> dict[str, np.ndarray]:
  """Any supported weight file -> flat arrays, chosen by extension, else by magic bytes."""
  path = existing_file(path)
  name = path.name.lower()
  reader = next((reader for end, reader in READERS.items() if name.endswith(end)), None)
  return (reader or _sniff_reader(path))(path)
