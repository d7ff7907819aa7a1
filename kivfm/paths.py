"""Run-directory paths: local folders and object stores (gs://, s3://, ...) through one API.

Everything kivfm reads or writes under a workdir goes through `etils.epath`, so a bucket works
as the shared workdir of every host of a pod or cluster.
"""
from __future__ import annotations

import os

import fsspec
from etils import epath

from kivfm.errors import ConfigError


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an epath.Path; local paths are made absolute (orbax requires it), URIs kept (and
  their filesystem package checked)."""
  if not is_remote(p):
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))
  scheme = os.fspath(p).split('://')[0]
  try:
    fsspec.get_filesystem_class(scheme)
  except (ImportError, ValueError) as error:
    raise ConfigError(f'{os.fspath(p)}: no filesystem for {scheme}:// ({error}). For buckets: '
                      f'pip install -r requirements-cloud.txt') from None
  return epath.Path(p)


def is_remote(p: str | os.PathLike) -> bool:
  """True for an object-store URI (scheme://...), False for a local path."""
  return '://' in os.fspath(p)


def write_text_atomic(target: epath.Path, text: str) -> None:
  write_bytes_atomic(target, text.encode())


def write_bytes_atomic(target: epath.Path, data: bytes) -> None:
  """Writes `data` to `target` via a temporary sibling and a rename (atomic on local disks)."""
  tmp = target.parent / f'.{target.name}.tmp'
  tmp.write_bytes(data)
  tmp.replace(target)
