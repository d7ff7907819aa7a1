"""Teacher-feature normalisers, selectable by name: none, zscore, ema_zscore, phi_s.

Teacher features x [..., C] (global vectors [B, C], patch maps [B, h, w, C]) are normalised before
the student is compared with them, so that no teacher dominates the loss through its feature scale.
Every normaliser has `__call__(x) -> y` and `inverse(y) -> x` (exact up to float error; maps
student predictions back into the teacher's space, e.g. to drive the teacher's own head).

Statistics live in `NormStats` variables: not `nnx.Param`, so optimizers never see them, with
logical axes (all None: replicated) like every other kivfm variable. Computation is float32;
outputs are cast to `dtype`.
  'none'        Identity.
  'zscore'      fixed per-channel (x - mean) / sqrt(var + eps), statistics over data (Theia).
  'ema_zscore'  the same with running statistics updated from every batch (UNIC).
  'phi_s'       PHI-S (Ranzinger et al. 2024): PCA rotation, a balancing rotation (normalised
                Hadamard matrix) and one scalar, so that every output channel has unit variance
                (RADIOv2.5).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kivfm.stats import FeatureStats

DEFAULT_EPS = 1e-6
DEFAULT_MOMENTUM = 0.99


class NormStats(nnx.Variable):
  """Non-trainable normaliser statistics (outside `nnx.Param`, so no optimizer updates them)."""


def norm_stats(value, axes: Sequence[str | None] | None = None) -> NormStats:
  """A NormStats holding `value`, with logical `axes` (default: None per dimension)."""
  value = jnp.asarray(value)
  axes = (None,) * value.ndim if axes is None else tuple(axes)
  if len(axes) != value.ndim:
    raise ValueError(f'logical axes {axes} do not match shape {value.shape}')
  return NormStats(value, logical_axes=axes)


def _assign(variable: NormStats, value) -> None:
  """Writes `value` into `variable`, keeping its shape and dtype."""
  value = jnp.asarray(value, variable.dtype)
  if value.shape != variable.shape:
    raise ValueError(f'statistics of shape {value.shape} for a variable of shape {variable.shape}')
  variable[...] = value


def _check_channels(x, channels: int) -> None:
  if x.shape[-1] != channels:
    raise ValueError(f'features have {x.shape[-1]} channels; the normaliser has {channels}')


# ----------------------------------------------------------------------------------------------
# none


class Identity(nnx.Module):
  """'none': y = x (cast to `dtype`)."""

  def __init__(self, channels: int | None = None, *, dtype=jnp.float32):
    self.channels = channels
    self.dtype = dtype

  def load_stats(self, stats: FeatureStats) -> None:
    """No statistics needed."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.astype(self.dtype)

  def inverse(self, y: jax.Array) -> jax.Array:
    return y.astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# zscore, ema_zscore


def standardize(x, mean, var, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the last axis, in float32."""
  return (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps)


def unstandardize(y, mean, var, eps: float) -> jax.Array:
  """Inverse of `standardize`."""
  return y.astype(jnp.float32) * jnp.sqrt(var + eps) + mean


class ZScore(nnx.Module):
  """'zscore': fixed per-channel z-score with statistics over data (Theia). Until `set_stats`
  (or `load_stats`) is called the statistics are mean 0, var 1: y = x / sqrt(1 + eps)."""

  def __init__(self, channels: int, *, mean=None, var=None, eps: float = DEFAULT_EPS,
               dtype=jnp.float32):
    self.channels, self.eps, self.dtype = channels, eps, dtype
    self.mean = norm_stats(jnp.zeros((channels,), jnp.float32))
    self.var = norm_stats(jnp.ones((channels,), jnp.float32))
    if (mean is None) != (var is None):
      raise ValueError('give both mean and var, or neither')
    if mean is not None:
      self.set_stats(mean, var)

  def set_stats(self, mean, var) -> None:
    """Per-channel mean and (population) variance, e.g. FeatureStats.mean / .var."""
    _assign(self.mean, mean)
    _assign(self.var, var)

  def load_stats(self, stats: FeatureStats) -> None:
    self.set_stats(stats.mean, stats.var)

  def __call__(self, x: jax.Array) -> jax.Array:
    _check_channels(x, self.channels)
    return standardize(x, self.mean[...], self.var[...], self.eps).astype(self.dtype)

  def inverse(self, y: jax.Array) -> jax.Array:
    _check_channels(y, self.channels)
    return unstandardize(y, self.mean[...], self.var[...], self.eps).astype(self.dtype)


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and population variance of x [..., C] over all leading dims (float32, jnp:
  works under jit, and over a sharded batch it is the global statistic)."""
  rows = x.astype(jnp.float32).reshape(-1, x.shape[-1])
  mean = rows.mean(0)
  return mean, jnp.square(rows - mean).mean(0)


def ema_update(stats_mean, stats_var, count, x, momentum: float = DEFAULT_MOMENTUM):
  """One EMA step of running per-channel statistics from the batch x [..., C].

  Returns (mean, var, count + 1). When count == 0 the running statistics become the batch's own:
  initialising at zeros / ones instead would bias them toward mean 0 and var 1 for ~1 / (1 - m)
  steps (hundreds at m = 0.99), and teacher channels with magnitudes in the tens or hundreds would
  then be "normalised" to huge targets that dominate the early loss, the imbalance the
  normalisation exists to remove. Afterwards stat = m * stat + (1 - m) * batch_stat, for the mean
  and for the variance (the batch variance around the batch mean, as in UNIC / BatchNorm).
  """
  batch_mean, batch_var = jax.lax.stop_gradient(batch_moments(x))
  first = count == 0
  blend = lambda old, new: jnp.where(first, new, momentum * old + (1.0 - momentum) * new)
  return blend(stats_mean, batch_mean), blend(stats_var, batch_var), count + 1


class EmaZScore(ZScore):
  """'ema_zscore': per-channel z-score with running statistics (UNIC); normalises as ZScore.

  Order within a train step: `update(x)` first, then `__call__(x)`, i.e. a batch is normalised
  with statistics that INCLUDE it. So the very first batch is normalised by its own statistics
  (there is no step with undefined statistics to special-case), and afterwards the current batch
  only moves them by a fraction (1 - m). Under jit, `update` runs on a module rebuilt with
  `nnx.merge`; return `nnx.state(module, NormStats)` from the step to keep the new statistics.
  """

  def __init__(self, channels: int, *, momentum: float = DEFAULT_MOMENTUM,
               eps: float = DEFAULT_EPS, dtype=jnp.float32):
    if not 0.0 <= momentum <= 1.0:
      raise ValueError(f'EMA momentum must lie in [0, 1], got {momentum}')
    super().__init__(channels, eps=eps, dtype=dtype)
    self.momentum = momentum
    self.count = norm_stats(jnp.zeros((), jnp.int32))

  def load_stats(self, stats: FeatureStats) -> None:
    """Running statistics come from the batches; data statistics are not used."""

  def update(self, x: jax.Array) -> None:
    """Folds the batch x [..., C] into the running statistics (in place)."""
    _check_channels(x, self.channels)
    mean, var, count = ema_update(self.mean[...], self.var[...], self.count[...], x,
                                  self.momentum)
    self.mean[...], self.var[...], self.count[...] = mean, var, count


# ----------------------------------------------------------------------------------------------
# phi_s: Hadamard matrices


def _is_prime(n: int) -> bool:
  return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
  """Q[i, j] = chi(j - i) for the quadratic character chi of GF(q), q prime (chi(0) = 0)."""
  chi = -np.ones(q)
  chi[0] = 0.0
  chi[np.arange(1, q) ** 2 % q] = 1.0
  index = np.arange(q)
  return chi[(index[None, :] - index[:, None]) % q]


def _core(q: int, sign: int) -> np.ndarray:
  """[[0, 1^T], [sign * 1, Q]] of order q + 1: skew (sign -1) or symmetric (sign 1) conference."""
  core = np.zeros((q + 1, q + 1))
  core[0, 1:] = 1.0
  core[1:, 0] = sign
  core[1:, 1:] = _jacobsthal(q)
  return core


def _paley_1(q: int) -> np.ndarray:
  """Paley I, q prime = 3 mod 4: I + skew conference matrix, order q + 1."""
  return np.eye(q + 1) + _core(q, -1)


def _paley_2(q: int) -> np.ndarray:
  """Paley II, q prime = 1 mod 4: symmetric conference matrix with every 0 replaced by
  [[1, -1], [-1, -1]] and every +-1 by +-[[1, 1], [1, -1]], order 2 (q + 1)."""
  return (np.kron(_core(q, 1), [[1.0, 1.0], [1.0, -1.0]]) +
          np.kron(np.eye(q + 1), [[1.0, -1.0], [-1.0, -1.0]]))


def _base_hadamard(m: int) -> np.ndarray | None:
  """A +-1 Hadamard matrix of order m from Paley I or II (q prime), or orders 1 and 2."""
  if m in (1, 2):
    return np.array([[1.0]]) if m == 1 else np.array([[1.0, 1.0], [1.0, -1.0]])
  if m % 4:
    return None
  if _is_prime(m - 1) and (m - 1) % 4 == 3:
    return _paley_1(m - 1)
  if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
    return _paley_2(m // 2 - 1)
  return None


def hadamard(n: int) -> np.ndarray | None:
  """A +-1 Hadamard matrix of order n (H H^T = n I), or None when none is constructible here.

  Sylvester doubling (kron with [[1, 1], [1, -1]]) of the smallest base from `_base_hadamard`:
  covers powers of two and 2^k (q + 1), 2^k 2 (q + 1) for primes q, e.g. 96, 256, 384, 768,
  1024, 1152, 1280, 1536. Orders needing prime powers or other constructions return None.
  """
  doublings = (n & -n).bit_length() - 1  # largest k with 2^k | n
  for k in range(doublings, -1, -1):
    base = _base_hadamard(n >> k)
    if base is not None:
      sylvester = np.ones((1, 1))
      for _ in range(k):
        sylvester = np.kron(sylvester, [[1.0, 1.0], [1.0, -1.0]])
      return np.kron(sylvester, base)
  return None


# ----------------------------------------------------------------------------------------------
# phi_s: equal-diagonal rotation without a Hadamard matrix


def _equalizing_angle(a_ii: float, a_jj: float, a_ij: float, target: float) -> float:
  """theta with (G A G^T)_ii = target for the rotation rows i' = c i + s j, j' = -s i + c j.

  (G A G^T)_ii = (a_ii + a_jj)/2 + p cos 2t + a_ij sin 2t with p = (a_ii - a_jj)/2, i.e.
  = mid + R cos(2t - phi); it sweeps [mid - R, mid + R], which contains a_ii and a_jj and so
  every target between them.
  """
  mid, p = (a_ii + a_jj) / 2, (a_ii - a_jj) / 2
  radius, phi = np.hypot(p, a_ij), np.arctan2(a_ij, p)
  return (phi + np.arccos(np.clip((target - mid) / radius, -1.0, 1.0))) / 2


def givens_equalizer(eigenvalues: np.ndarray) -> np.ndarray:
  """Orthogonal R with diag(R diag(eigenvalues) R^T) = mean(eigenvalues) in every entry.

  The constructive Schur-Horn argument: the mean lies between the smallest and the largest open
  diagonal entry; a Givens rotation of those two sets the smaller one to the mean exactly (the
  trace, hence the mean of the rest, is kept), which closes it. At most n - 1 rotations.
  """
  a = np.diag(np.asarray(eigenvalues, np.float64))
  n = a.shape[0]
  rotation, target = np.eye(n), np.trace(a) / n
  tol = 1e-13 * max(np.abs(np.diag(a)).max(initial=0.0), np.finfo(np.float64).tiny)
  open_ = np.ones(n, bool)
  for _ in range(n - 1):
    gap = np.where(open_, np.diag(a) - target, np.nan)
    i, j = np.nanargmin(gap), np.nanargmax(gap)
    if gap[j] - gap[i] <= tol:
      break
    t = _equalizing_angle(a[i, i], a[j, j], a[i, j], target)
    g = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    a[[i, j], :] = g @ a[[i, j], :]
    a[:, [i, j]] = a[:, [i, j]] @ g.T
    rotation[[i, j], :] = g @ rotation[[i, j], :]
    open_[i] = False
  return rotation


def balancing_rotation(eigenvalues: np.ndarray, method: str = 'auto') -> np.ndarray:
  """Orthogonal H with an equal diagonal of H diag(eigenvalues) H^T.

  'hadamard': the normalised Hadamard matrix (entries +-1/sqrt(C): the property holds for any
  eigenvalues), PHI-S's choice; 'givens': `givens_equalizer`; 'auto': Hadamard when `hadamard`
  constructs one for C, else Givens.
  """
  channels = len(eigenvalues)
  if method not in ('auto', 'hadamard', 'givens'):
    raise ValueError(f'unknown balancing method {method!r}; allowed: auto, hadamard, givens')
  h = None if method == 'givens' else hadamard(channels)
  if h is not None:
    return h / np.sqrt(channels)
  if method == 'hadamard':
    raise ValueError(f'no Hadamard matrix constructible for {channels} channels; use givens')
  return givens_equalizer(eigenvalues)


def phi_s_transform(mean, cov, *, eps: float = 1e-12,
                    method: str = 'auto') -> tuple[np.ndarray, np.ndarray, float]:
  """PHI-S in float64: y = (x - mean) @ rotation / scale, returns (mean, rotation, scale).

  rotation = U H^T and scale = sqrt(mean(lambda)), where cov = U diag(lambda) U^T (eigenvalues
  clipped at 0) and H comes from `balancing_rotation`. Then Cov(y) = H diag(lambda) H^T / scale^2
  has every diagonal entry 1. `eps` floors scale^2.
  """
  mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
  if cov.shape != (mean.size, mean.size):
    raise ValueError(f'covariance {cov.shape} does not fit a mean of {mean.size} channels')
  eigenvalues, u = np.linalg.eigh((cov + cov.T) / 2)
  eigenvalues = np.clip(eigenvalues, 0.0, None)
  h = balancing_rotation(eigenvalues, method)
  scale = float(np.sqrt(max(eigenvalues.mean(), eps)))
  return mean, u @ h.T, scale


class PhiS(nnx.Module):
  """'phi_s': y = H U^T (x - mean) / s (RADIOv2.5); see `phi_s_transform`. Until `set_stats`
  (or `from_stats`, `load_stats`) the transform is the identity."""

  def __init__(self, channels: int, *, method: str = 'auto', eps: float = 1e-12,
               dtype=jnp.float32):
    self.channels, self.method, self.eps, self.dtype = channels, method, eps, dtype
    self.mean = norm_stats(jnp.zeros((channels,), jnp.float32))
    self.rotation = norm_stats(jnp.eye(channels, dtype=jnp.float32))
    self.scale = norm_stats(jnp.ones((), jnp.float32))

  @classmethod
  def from_stats(cls, mean, cov, **kw) -> PhiS:
    module = cls(np.shape(mean)[-1], **kw)
    module.set_stats(mean, cov)
    return module

  def set_stats(self, mean, cov) -> None:
    """Builds the transform from the data mean [C] and covariance [C, C] (numpy float64)."""
    mean, rotation, scale = phi_s_transform(mean, cov, eps=self.eps, method=self.method)
    _assign(self.mean, mean)
    _assign(self.rotation, rotation)
    _assign(self.scale, scale)

  def load_stats(self, stats: FeatureStats) -> None:
    self.set_stats(stats.mean, stats.cov)

  def __call__(self, x: jax.Array) -> jax.Array:
    _check_channels(x, self.channels)
    centred = x.astype(jnp.float32) - self.mean[...]
    y = jnp.matmul(centred, self.rotation[...], precision=jax.lax.Precision.HIGHEST)
    return (y / self.scale[...]).astype(self.dtype)

  def inverse(self, y: jax.Array) -> jax.Array:
    _check_channels(y, self.channels)
    scaled = y.astype(jnp.float32) * self.scale[...]
    x = jnp.matmul(scaled, self.rotation[...].T, precision=jax.lax.Precision.HIGHEST)
    return (x + self.mean[...]).astype(self.dtype)


# ----------------------------------------------------------------------------------------------
# factory

NORMALIZERS = {'none': Identity, 'zscore': ZScore, 'ema_zscore': EmaZScore, 'phi_s': PhiS}


def make(name: str, channels: int, *, stats: FeatureStats | None = None, **kw) -> nnx.Module:
  """The normaliser `name` for `channels`-wide features; `kw` go to its constructor. With
  `stats` (a FeatureStats over the teacher's features) its statistics are loaded; 'zscore' and
  'phi_s' need them (else they start as the identity), 'none' and 'ema_zscore' ignore them."""
  if name not in NORMALIZERS:
    raise ValueError(f'unknown teacher-feature normaliser {name!r}; allowed: '
                     f'{", ".join(NORMALIZERS)}')
  module = NORMALIZERS[name](channels, **kw)
  if stats is not None:
    if stats.channels != channels:
      raise ValueError(f'statistics have {stats.channels} channels; the {name!r} normaliser '
                       f'{channels}')
    module.load_stats(stats)
  return module
