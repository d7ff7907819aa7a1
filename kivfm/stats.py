"""Streaming per-channel feature statistics (float64 numpy), for teacher-feature normalisers.

`FeatureStats` accumulates count, mean and the co-moment matrix M2 = sum (x - mean)(x - mean)^T
of rows x in R^C. Batches are combined with the exact pairwise rule of Chan, Golub & LeVeque
(1979), so any chunking of the data gives numpy's result on the concatenated data up to float
rounding. Variances and covariances are population values (ddof=0): a normaliser built from them
gives exactly unit variance on the data they came from.
"""
from __future__ import annotations

import io
import os

import numpy as np
from etils import epath

from kivfm import paths

_KEYS = ('count', 'mean', 'm2')


class FeatureStats:
  """Per-channel mean, variance and full covariance of features [..., C], streamed."""

  def __init__(self, channels: int | None = None):
    """`channels` is fixed by the first `update` when not given."""
    self.channels = channels
    self.count = 0
    self._mean = None if channels is None else np.zeros(channels)
    self._m2 = None if channels is None else np.zeros((channels, channels))

  @classmethod
  def from_batch(cls, x: np.ndarray) -> FeatureStats:
    """Statistics of one batch [..., C]: leading dims are flattened into rows."""
    rows = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    stats = cls(rows.shape[1])
    if rows.shape[0]:
      stats.count = rows.shape[0]
      stats._mean = rows.mean(0)
      centred = rows - stats._mean
      stats._m2 = centred.T @ centred
    return stats

  @classmethod
  def from_moments(cls, count: int, mean: np.ndarray, m2: np.ndarray) -> FeatureStats:
    """Statistics with the given count, mean [C] and co-moment matrix m2 [C, C]."""
    stats = cls(np.size(mean))
    stats.count, stats._mean, stats._m2 = int(count), np.asarray(mean, np.float64), np.asarray(
        m2, np.float64)
    return stats

  def moments(self) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, m2): what `from_moments` takes."""
    self._require_data()
    return self.count, self._mean.copy(), self._m2.copy()

  def update(self, x: np.ndarray) -> FeatureStats:
    """Adds the rows of x [..., C]; returns self."""
    return self.merge(FeatureStats.from_batch(x))

  def merge(self, other: FeatureStats) -> FeatureStats:
    """Adds the data summarised by `other` (exact parallel merge); returns self."""
    self._check_channels(other.channels)
    if other.count == 0:
      return self
    if self.count == 0:
      self.count, self._mean, self._m2 = other.count, other._mean.copy(), other._m2.copy()
      return self
    total = self.count + other.count
    delta = other._mean - self._mean
    self._mean = self._mean + delta * (other.count / total)
    self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.count * other.count / total)
    self.count = total
    return self

  def _check_channels(self, channels: int) -> None:
    if self.channels is None:
      self.channels = channels
    elif channels != self.channels:
      raise ValueError(f'features have {channels} channels; these statistics have {self.channels}')

  def _require_data(self) -> None:
    if self.count == 0:
      raise ValueError('no data: call FeatureStats.update before reading statistics')

  @property
  def mean(self) -> np.ndarray:
    self._require_data()
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    """Population covariance [C, C] (ddof=0)."""
    self._require_data()
    return self._m2 / self.count

  @property
  def var(self) -> np.ndarray:
    """Population variance per channel (ddof=0)."""
    self._require_data()
    return np.diag(self._m2) / self.count

  @property
  def std(self) -> np.ndarray:
    return np.sqrt(self.var)

  def save(self, path: str | os.PathLike) -> None:
    """Writes an .npz at exactly `path` (atomically: temp file, then rename)."""
    self._require_data()
    buffer = io.BytesIO()
    np.savez(buffer, count=np.int64(self.count), mean=self._mean, m2=self._m2)
    paths.write_bytes_atomic(paths.path(path), buffer.getvalue())

  @classmethod
  def load(cls, path: str | os.PathLike) -> FeatureStats:
    """Reads a file written by `save`."""
    data = np.load(io.BytesIO(paths.path(path).read_bytes()), allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError(f'feature statistics file {os.fspath(path)!r} is not an .npz archive')
    with data:
      missing = [key for key in _KEYS if key not in data.files]
      if missing:
        raise ValueError(f'feature statistics file {os.fspath(path)!r} lacks keys {missing} '
                         f'(has {sorted(data.files)}); expected {list(_KEYS)} as written by '
                         f'FeatureStats.save')
      count, mean, m2 = int(data['count']), data['mean'], data['m2']
    if mean.ndim != 1 or m2.shape != (mean.size, mean.size):
      raise ValueError(f'feature statistics file {os.fspath(path)!r}: mean {mean.shape} and '
                       f'm2 {m2.shape} do not fit one channel count')
    return cls.from_moments(count, mean, m2)

  def __repr__(self) -> str:
    return f'FeatureStats(channels={self.channels}, count={self.count})'


def stats_dir(config, workdir: str) -> epath.Path:
  """Where a run keeps its teacher statistics (`config.unifier.stats_dir` or DIR/teacher_stats)."""
  return paths.path(config.unifier.stats_dir or paths.path(workdir) / 'teacher_stats')


def stats_path(directory, alias: str, kind: str) -> epath.Path:
  """File of teacher `alias`'s statistics of `kind` ('cls' or 'patches')."""
  return paths.path(directory) / f'{alias}_{kind}.npz'
