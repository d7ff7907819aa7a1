"""Errors raised while locating, verifying and reading weight files, and the checks raising them.

Every message names the file (or source) involved; MissingWeightFileError also says how to get it.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

# What malformed input can raise anywhere while parsing; readers turn these into
# CorruptWeightFileError.
PARSE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, struct.error, zipfile.BadZipFile, OverflowError, RecursionError)


class WeightFileError(Exception):
  """Base class of every error raised by `kivfm.weights`."""


class CorruptWeightFileError(WeightFileError):
  """The file is truncated, garbled or not in the format its name claims."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path, self.reason = str(path), reason
    super().__init__(f'{path}: corrupt or truncated weight file: {reason}')


class ChecksumMismatchError(WeightFileError):
  """The file's sha256 differs from the one the weight source pins."""

  def __init__(self, path: str | os.PathLike, expected: str, actual: str, pinned_by: str = ''):
    self.path, self.expected, self.actual = str(path), expected, actual
    super().__init__(
        f'{path}: sha256 mismatch: expected {expected}{pinned_by}, got {actual}. The file is '
        'damaged or a different version: delete it and fetch it again.')


class UnsafeCheckpointError(WeightFileError):
  """The pickle asks for something that rebuilding tensors never needs; nothing was executed."""

  def __init__(self, path: str | os.PathLike, forbidden: str):
    self.path, self.forbidden = str(path), forbidden
    super().__init__(
        f'{path}: refusing to load: the pickle references {forbidden}, which is not needed to '
        'rebuild tensors (the file may be malicious; nothing from it was executed).')


class MissingWeightFileError(WeightFileError):
  """The weight file is not available locally; the message says how to get it."""


def existing_file(path: str | os.PathLike) -> Path:
  """`path` as a Path; MissingWeightFileError if it is not a file."""
  path = Path(path)
  if not path.is_file():
    raise MissingWeightFileError(f'{path}: no such weight file')
  return path


class ShapeMismatchError(WeightFileError):
  """Loaded weights do not fit the model: missing or unexpected keys, or wrong shapes."""

  def __init__(self, source: str, missing: list[str], unexpected: list[str],
               wrong_shapes: dict[str, tuple[tuple, tuple]]):
    self.source, self.missing, self.unexpected = source, missing, unexpected
    self.wrong_shapes = wrong_shapes
    lines = [f'weights from {source} do not match the model:']
    if missing:
      lines.append(f'  {len(missing)} missing key(s):')
      lines += [f'    {key}' for key in missing]
    if unexpected:
      lines.append(f'  {len(unexpected)} unexpected key(s):')
      lines += [f'    {key}' for key in unexpected]
    if wrong_shapes:
      lines.append(f'  {len(wrong_shapes)} shape mismatch(es):')
      lines += [f'    {key}: expected {want}, got {got}'
                for key, (want, got) in wrong_shapes.items()]
    super().__init__('\n'.join(lines))


def check_keys_and_shapes(expected: Mapping[str, tuple], got: Mapping[str, np.ndarray],
                          source: str) -> None:
  """Raises one ShapeMismatchError listing every missing key, unexpected key and wrong shape."""
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  wrong_shapes = {key: (tuple(expected[key]), tuple(np.shape(got[key])))
                  for key in sorted(set(expected) & set(got))
                  if tuple(expected[key]) != tuple(np.shape(got[key]))}
  if missing or unexpected or wrong_shapes:
    raise ShapeMismatchError(source, missing, unexpected, wrong_shapes)
