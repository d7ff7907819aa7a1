"""Metrics out: DIR/metrics.jsonl, TensorBoard event files (tensorboardX) and terminal progress.

DIR may be an object store (gs://...): files that cannot be appended to there are kept in memory
and rewritten whole at most every `REMOTE_FLUSH_S` seconds and at close.
"""
from __future__ import annotations

import json
import logging
import sys
import time

from kivfm import paths

REMOTE_FLUSH_S = 60.0


class Progress:
  """A progress bar with ETA on a terminal, plain periodic lines otherwise."""

  def __init__(self, total: int, start: int, mode: str = 'auto', stream=None):
    self.stream = stream or sys.stderr
    if mode == 'auto':
      mode = 'bar' if self.stream.isatty() else 'lines'
    self.mode, self.total, self.start = mode, total, start
    self.t0 = time.time()

  def update(self, step: int, summary: str, log_line: bool) -> None:
    if self.mode == 'none':
      return
    done = step - self.start
    elapsed = time.time() - self.t0
    eta = elapsed / done * (self.total - step) if done else float('nan')
    text = f'step {step}/{self.total} | {summary} | eta {_hms(eta)}'
    if self.mode == 'bar':
      width = 24
      filled = int(width * step / max(self.total, 1))
      self.stream.write(f'\r[{"#" * filled}{"." * (width - filled)}] {text}\033[K')
      if step >= self.total:
        self.stream.write('\n')
      self.stream.flush()
    elif log_line or step >= self.total:
      self.stream.write(text + '\n')
      self.stream.flush()


def _hms(seconds: float) -> str:
  if seconds != seconds:  # nan
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class MetricsWriter:
  """Appends one JSON object per step to metrics.jsonl and mirrors scalars to TensorBoard.

  Only the lead process (process 0) writes; the others hold a writer that does nothing.
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
    """`start_step`: the step training resumes from; records after it (written by a run that
    was killed before its next checkpoint) are dropped, as that run's steps are redone."""
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      directory = paths.path(workdir)
      directory.mkdir(parents=True, exist_ok=True)
      self._jsonl = _JsonLines(directory / 'metrics.jsonl', start_step)
      try:
        from tensorboardX import SummaryWriter, record_writer
        if paths.is_remote(directory):
          scheme = str(directory).split('://')[0]
          record_writer.register_writer_factory(scheme, _EpathEventFiles())
        self._tb = SummaryWriter(str(directory / 'tensorboard'))
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard event files')

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write({'step': int(step), **{k: float(v) for k, v in scalars.items()}})
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _JsonLines:
  """metrics.jsonl without the records after `start_step`: appended line by line on a local
  disk (a kill loses nothing), rewritten whole on an object store."""

  def __init__(self, path, start_step: int):
    self.path, self.remote = path, paths.is_remote(path)
    self.records = [r for r in read_jsonl(path) if r['step'] <= start_step] if path.exists() else []
    paths.write_text_atomic(path, ''.join(json.dumps(r) + '\n' for r in self.records))
    self.file = None if self.remote else path.open('a')
    self.flushed = time.time()

  def write(self, record: dict) -> None:
    if self.file is not None:
      self.file.write(json.dumps(record) + '\n')
      self.file.flush()
      return
    self.records.append(record)
    if time.time() - self.flushed > REMOTE_FLUSH_S:
      self.flush()

  def flush(self) -> None:
    if self.remote:
      paths.write_text_atomic(self.path, ''.join(json.dumps(r) + '\n' for r in self.records))
      self.flushed = time.time()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    self.flush()


class _EpathEventFiles:
  """tensorboardX writer factory for object stores: an event file kept in memory and written
  whole through epath on each flush (object stores cannot append)."""

  def open(self, path: str):
    return _EpathEventFile(paths.path(path))

  def directory_check(self, path: str) -> None:
    paths.path(path).mkdir(parents=True, exist_ok=True)


class _EpathEventFile:

  def __init__(self, path):
    self.path, self.data = path, bytearray()

  def write(self, data: bytes) -> None:
    self.data += data

  def flush(self) -> None:
    self.path.write_bytes(bytes(self.data))

  def close(self) -> None:
    self.flush()


def read_jsonl(path) -> list[dict]:
  """Records of a metrics.jsonl (local path or URI); a line cut short by a kill is ignored."""
  records = []
  for line in paths.path(path).read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records
