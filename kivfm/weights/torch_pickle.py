"""Reads PyTorch checkpoints without torch and without running any code from the file.

A checkpoint is a pickle in which every tensor is rebuilt by calling one of a few torch
functions on a "persistent" reference to a storage whose bytes live outside the pickle.
`_RestrictedUnpickler` resolves only those few globals, to local stand-ins that merely record
what to rebuild; any other global (`os.system`, `builtins.eval`, ...) raises
UnsafeCheckpointError before it could be called. The storages are then read and every tensor
is cut out of its storage with its own offset and strides (views, transposes, shared storages).

Two layouts:
  * zip (torch >= 1.6): records `<archive>/data.pkl` (the pickle), `<archive>/data/<key>` (raw
    storage bytes, in the byte order of the optional `<archive>/byteorder` record);
  * legacy (`_use_new_zipfile_serialization=False`): pickles back to back: magic number,
    protocol version 1001, a sys_info dict, the object, the list of storage keys; then for
    each key an int64 element count followed by the storage's raw bytes, all little-endian.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import ml_dtypes
import numpy as np

from kivfm.weights.errors import (PARSE_ERRORS, CorruptWeightFileError, UnsafeCheckpointError,
                                  existing_file)

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> element type (torch.storage.UntypedStorage holds bytes).
STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'ComplexFloatStorage': np.complex64,
    'ComplexDoubleStorage': np.complex128}
# Dtypes that torch pickles as globals (torch.uint16, ...) for `_rebuild_tensor_v3`.
TENSOR_DTYPES = {'uint16': np.uint16, 'uint32': np.uint32, 'uint64': np.uint64,
                 'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for a torch storage class: only its element type matters."""
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage named by `key`; `byte_offset` is non-zero only for legacy storage views."""
  key: str
  dtype: np.dtype
  byte_offset: int = 0


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """What `_rebuild_tensor_v2/v3` would build: offset, shape and strides in elements."""
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]
  dtype: np.dtype


def _ints(values, what: str) -> tuple[int, ...]:
  values = tuple(values)
  if not all(type(v) is int and v >= 0 for v in values):
    raise ValueError(f'tensor {what} {values!r} are not non-negative integers')
  return values


def _tensor_ref(storage, offset, size, stride, dtype: np.dtype | None = None) -> _TensorRef:
  if not isinstance(storage, _StorageRef):
    raise ValueError(f'tensor rebuilt from {type(storage).__name__}, not from a storage')
  (offset,) = _ints([offset], 'offset')
  shape, strides = _ints(size, 'sizes'), _ints(stride, 'strides')
  if len(shape) != len(strides):
    raise ValueError(f'tensor sizes {shape} and strides {strides} differ in length')
  return _TensorRef(storage, offset, shape, strides, storage.dtype if dtype is None else dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  if not isinstance(dtype, np.dtype):
    raise ValueError(f'tensor dtype {dtype!r} is not a known torch dtype')
  return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return data


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter_with_state,
    **{('torch', name): _StorageType(np.dtype(dtype)) for name, dtype in STORAGE_DTYPES.items()},
    ('torch.storage', 'UntypedStorage'): _StorageType(np.dtype(np.uint8)),
    **{('torch', name): np.dtype(dtype) for name, dtype in TENSOR_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only ALLOWED_GLOBALS and hands storage ids to `load_storage`."""

  def __init__(self, file: BinaryIO, path: Path,
               load_storage: Callable[[tuple], _StorageRef] | None = None):
    super().__init__(file, encoding='utf-8')
    self._path, self._load_storage = path, load_storage

  def find_class(self, module: str, name: str):
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(self._path, f'the global {module}.{name}') from None

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise ValueError(f'unexpected persistent id {pid!r}')
    return self._load_storage(pid)


def _storage_id(pid, length: int) -> tuple:
  """Checks a persistent id ('storage', storage_type, key, location, numel, ...)."""
  if not (isinstance(pid, tuple) and len(pid) == length and pid[0] in ('storage', b'storage')
          and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
    raise ValueError(f'unexpected persistent id {pid!r}')
  return pid


def _tensor_array(ref: _TensorRef, buffers: dict[str, np.ndarray], byteswap: bool) -> np.ndarray:
  """Cuts a tensor out of its storage bytes (bounds-checked), as an owned contiguous array."""
  if ref.storage.key not in buffers:
    raise ValueError(f'storage {ref.storage.key!r} has no data in the file')
  item = ref.dtype.itemsize
  if 0 in ref.shape:
    return np.zeros(ref.shape, ref.dtype)
  start = ref.storage.byte_offset + ref.offset * item
  stop = start + item * (1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides)))
  data = buffers[ref.storage.key]
  if stop > data.size:
    raise ValueError(f'a tensor of shape {ref.shape} reads bytes {start}:{stop} of storage '
                     f'{ref.storage.key!r}, which has {data.size}')
  flat = data[start:stop].view(ref.dtype)
  strides = tuple(s * item for s in ref.strides)
  array = np.lib.stride_tricks.as_strided(flat, ref.shape, strides, writeable=False).copy()
  return array.byteswap() if byteswap else array


def _materialize(obj, buffers: dict[str, np.ndarray], byteswap: bool):
  """Replaces every _TensorRef in nested dicts / lists / tuples by its array."""
  if isinstance(obj, _TensorRef):
    return _tensor_array(obj, buffers, byteswap)
  if isinstance(obj, dict):
    return {key: _materialize(value, buffers, byteswap) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(value, buffers, byteswap) for value in obj)
  return obj


def _read_zip(path: Path):
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
    if not pickles:
      raise ValueError('zip archive without <archive>/data.pkl: not a torch checkpoint')
    prefix = pickles[0][:-len('data.pkl')]
    storages: dict[str, _StorageRef] = {}

    def load_storage(pid) -> _StorageRef:
      _, storage_type, key, _location, _numel = _storage_id(pid, 5)
      return storages.setdefault(key, _StorageRef(key, storage_type.dtype))

    with archive.open(pickles[0]) as file:
      obj = _RestrictedUnpickler(file, path, load_storage).load()
    buffers = {key: np.frombuffer(archive.read(f'{prefix}data/{key}'), np.uint8)
               for key in storages}
    byteorder = 'little'
    if f'{prefix}byteorder' in archive.namelist():
      byteorder = archive.read(f'{prefix}byteorder').decode().strip()
  if byteorder not in ('little', 'big'):
    raise ValueError(f'unknown byteorder record {byteorder!r}')
  return _materialize(obj, buffers, byteswap=byteorder == 'big')


def _read_exact(file: BinaryIO, size: int) -> bytes:
  left = os.fstat(file.fileno()).st_size - file.tell()
  if size > left:
    raise EOFError(f'file ends {size - left} bytes early while reading storage data')
  return file.read(size)


def _read_legacy(path: Path):
  storages: dict[str, _StorageRef] = {}

  def load_storage(pid) -> _StorageRef:
    _, storage_type, key, _location, _numel, view = _storage_id(pid, 6)
    root = storages.setdefault(key, _StorageRef(key, storage_type.dtype))
    if view is None:
      return root
    _view_key, offset, _view_size = view
    (offset,) = _ints([offset], 'storage view offset')
    return _StorageRef(key, root.dtype, offset * root.dtype.itemsize)

  with open(path, 'rb') as file:

    def plain():  # a pickle without tensors
      return _RestrictedUnpickler(file, path).load()

    if plain() != LEGACY_MAGIC_NUMBER:
      raise ValueError('bad magic number: neither a zip nor a legacy torch checkpoint')
    if (version := plain()) != LEGACY_PROTOCOL_VERSION:
      raise ValueError(f'unsupported legacy protocol version {version!r}')
    plain()  # sys_info: storages are little-endian whatever it says.
    obj = _RestrictedUnpickler(file, path, load_storage).load()
    keys = plain()
    if not (isinstance(keys, list) and set(keys) <= set(storages)):
      raise ValueError(f'storage key list {keys!r:.200} does not match the pickled tensors')
    buffers = {}
    for key in keys:
      (count,) = _ints(struct.unpack('<q', _read_exact(file, 8)), 'storage element count')
      nbytes = count * storages[key].dtype.itemsize
      buffers[key] = np.frombuffer(_read_exact(file, nbytes), np.uint8)
  return _materialize(obj, buffers, byteswap=False)


def read_torch_restricted(path) -> Any:
  """The unpickled object of a torch checkpoint (zip or legacy), tensors as numpy arrays.

  Only plain containers and tensors are rebuilt; bfloat16 stays `ml_dtypes.bfloat16`.
  Raises UnsafeCheckpointError for any other global, CorruptWeightFileError when malformed.
  """
  path = existing_file(path)
  try:
    return _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
  except PARSE_ERRORS as error:
    raise CorruptWeightFileError(path, f'cannot read torch checkpoint: {error}') from error
