"""Metrics out: DIR/metrics.jsonl, TensorBoard event files (tensorboardX) and terminal progress."""
from __future__ import annotations

import json
import logging
import os
import sys
import time


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
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if os.path.exists(path):
        kept = [r for r in read_jsonl(path) if r['step'] <= start_step]
        with open(path + '.tmp', 'w') as f:
          f.writelines(json.dumps(r) + '\n' for r in kept)
        os.replace(path + '.tmp', path)
      self._jsonl = open(path, 'a', buffering=1)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard event files')

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """Records of a metrics.jsonl; a line cut short by a kill is ignored."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records
