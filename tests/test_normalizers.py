"""Teacher-feature statistics (kivfm.stats) and normalisers (kivfm.models.normalizers)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kivfm import sharding
from kivfm.models import layers, normalizers
from kivfm.models.normalizers import NormStats
from kivfm.stats import FeatureStats


def correlated_features(rng, n: int, channels: int, *, low=0.1, high=30.0) -> np.ndarray:
  """float32 rows [n, C]: mixed channels, scales from `low` to `high`, large offsets."""
  mixing = rng.normal(size=(channels, channels)) / np.sqrt(channels)
  scales = np.geomspace(low, high, channels)
  offsets = rng.normal(scale=50.0, size=channels)
  return ((rng.normal(size=(n, channels)) @ mixing) * scales + offsets).astype(np.float32)


def stats_of(x: np.ndarray) -> FeatureStats:
  return FeatureStats().update(x)


def channel_cov(y) -> np.ndarray:
  rows = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
  return np.cov(rows, rowvar=False, bias=True)


# ---------------------------------------------------------------------------------------------
# FeatureStats


def test_feature_stats_match_numpy_over_uneven_chunks():
  rng = np.random.default_rng(0)
  c = 7
  chunks = [rng.normal(size=(5, c)), rng.normal(size=(2, 3, c)), np.zeros((0, c)),
            rng.normal(size=(1, c)), rng.normal(size=(3, 2, 4, c)), rng.normal(size=(17, c))]
  chunks = [x * np.arange(1, c + 1) + 1e4 for x in chunks]  # scales and a large offset
  stats = FeatureStats()
  for x in chunks:
    stats.update(x)
  rows = np.concatenate([x.reshape(-1, c) for x in chunks])
  assert stats.count == rows.shape[0] == 5 + 6 + 1 + 24 + 17
  np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.var, rows.var(0), rtol=1e-9)
  np.testing.assert_allclose(stats.std, rows.std(0), rtol=1e-9)
  np.testing.assert_allclose(stats.cov, np.cov(rows, rowvar=False, bias=True), rtol=1e-9,
                             atol=1e-9)


def test_feature_stats_merge_and_errors():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(10, 3)), rng.normal(size=(4, 2, 3))
  merged = stats_of(a).merge(stats_of(b))
  whole = stats_of(np.concatenate([a, b.reshape(-1, 3)]))
  np.testing.assert_allclose(merged.cov, whole.cov, rtol=1e-12)
  with pytest.raises(ValueError, match='4 channels'):
    merged.update(np.zeros((2, 4)))
  with pytest.raises(ValueError, match='no data'):
    FeatureStats(3).mean


def test_feature_stats_save_load_roundtrip(tmp_path):
  stats = stats_of(np.random.default_rng(2).normal(size=(2, 9, 5)))
  path = tmp_path / 'teacher.npz'
  stats.save(path)
  loaded = FeatureStats.load(path)
  assert loaded.count == stats.count and loaded.channels == 5
  np.testing.assert_array_equal(loaded.mean, stats.mean)
  np.testing.assert_array_equal(loaded.cov, stats.cov)
  loaded.update(np.ones((1, 5)))  # a loaded accumulator keeps accumulating


def test_feature_stats_load_names_file_and_missing_keys(tmp_path):
  path = tmp_path / 'partial.npz'
  np.savez(path, mean=np.zeros(3))
  with pytest.raises(ValueError, match=r"partial\.npz.*lacks keys \['count', 'm2'\]"):
    FeatureStats.load(path)
  np.save(tmp_path / 'plain.npy', np.zeros(3))
  with pytest.raises(ValueError, match=r'plain\.npy.*not an \.npz'):
    FeatureStats.load(tmp_path / 'plain.npy')


# ---------------------------------------------------------------------------------------------
# none, zscore


def test_identity_is_identity():
  x = jnp.arange(12.0).reshape(2, 6)
  norm = normalizers.make('none', 6)
  np.testing.assert_array_equal(norm(x), x)
  np.testing.assert_array_equal(norm.inverse(x), x)


def test_zscore_standardises_its_own_data():
  x = correlated_features(np.random.default_rng(3), 2 * 4 * 4, 16).reshape(2, 4, 4, 16)
  stats = stats_of(x)
  norm = normalizers.make('zscore', 16, stats=stats, eps=0.0)
  y = np.asarray(norm(jnp.asarray(x)), np.float64).reshape(-1, 16)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)  # float32 x - mean
  np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-5)
  np.testing.assert_allclose(norm.inverse(norm(x)), x, rtol=1e-5, atol=1e-4)
  same = normalizers.ZScore(16, mean=stats.mean, var=stats.var, eps=0.0)
  np.testing.assert_allclose(same(x), norm(x), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# ema_zscore


def ema_reference(batches, momentum):
  """Hand-written numpy EMA: first batch initialises, then stat = m stat + (1 - m) batch."""
  states = []
  for i, x in enumerate(batches):
    rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    mean, var = rows.mean(0), rows.var(0)
    if i:
      mean = momentum * states[-1][0] + (1 - momentum) * mean
      var = momentum * states[-1][1] + (1 - momentum) * var
    states.append((mean, var))
  return states


def ema_batches():
  rng = np.random.default_rng(4)
  shapes = [(6, 5), (2, 3, 3, 5), (4, 5)]
  return [correlated_features(rng, int(np.prod(s[:-1])), 5).reshape(s) + 3.0 * i
          for i, s in enumerate(shapes)]


def test_ema_update_matches_numpy_sequence():
  batches, momentum, eps = ema_batches(), 0.9, 1e-6
  norm = normalizers.make('ema_zscore', 5, momentum=momentum, eps=eps)
  for step, (x, (mean, var)) in enumerate(zip(batches, ema_reference(batches, momentum))):
    norm.update(jnp.asarray(x))
    assert int(norm.count[...]) == step + 1
    np.testing.assert_allclose(norm.mean[...], mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(norm.var[...], var, rtol=1e-5)
    np.testing.assert_allclose(norm(x), (x - mean) / np.sqrt(var + eps), rtol=1e-4, atol=1e-4)
  assert normalizers.make('ema_zscore', 5).momentum == normalizers.DEFAULT_MOMENTUM == 0.99


def test_ema_update_under_jit_on_split_module():
  batches, momentum = ema_batches(), 0.9
  graphdef, state = nnx.split(normalizers.EmaZScore(5, momentum=momentum))

  @jax.jit
  def step(state, x):
    norm = nnx.merge(graphdef, state)
    norm.update(x)
    return nnx.state(norm, NormStats), norm(x)

  for x, (mean, var) in zip(batches, ema_reference(batches, momentum)):
    state, y = step(state, jnp.asarray(x))
    np.testing.assert_allclose(state['mean'][...], mean, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(state['var'][...], var, rtol=1e-5)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-4)
  assert int(state['count'][...]) == 3
  norm = nnx.merge(graphdef, state)
  np.testing.assert_allclose(norm.inverse(norm(batches[0])), batches[0], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# phi_s


@pytest.mark.parametrize('n', [1, 2, 12, 20, 36, 96, 256, 384, 768, 1024, 1152, 1280])
def test_hadamard_is_orthogonal_with_equal_magnitude_entries(n):
  h = normalizers.hadamard(n) / np.sqrt(n)
  np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize('n', [3, 6, 7, 100])
def test_hadamard_absent_for_unsupported_orders(n):
  assert normalizers.hadamard(n) is None
  with pytest.raises(ValueError, match='no Hadamard'):
    normalizers.balancing_rotation(np.ones(n), 'hadamard')


@pytest.mark.parametrize('channels, method', [
    (384, 'auto'),  # Paley I (q = 11) x Sylvester 32
    (96, 'auto'),  # Paley I (q = 11) x Sylvester 8
    (36, 'auto'),  # Paley II (q = 17)
    (6, 'auto'),  # no Hadamard matrix: Givens fallback
    (64, 'givens')])
def test_phi_s_equal_unit_variance_and_exact_inverse(channels, method):
  rng = np.random.default_rng(channels)
  x = correlated_features(rng, max(2 * channels, 256), channels)
  stats = stats_of(x)
  norm = normalizers.PhiS.from_stats(stats.mean, stats.cov, method=method)
  y = norm(jnp.asarray(x))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(np.diag(channel_cov(y)), 1.0, rtol=1e-5)
  assert np.abs(np.asarray(y, np.float64).mean(0)).max() < 1e-4
  x_back = np.asarray(norm.inverse(y), np.float64)
  np.testing.assert_allclose(x_back, x, rtol=1e-5, atol=1e-5 * np.abs(x).max())


def test_phi_s_patch_maps_and_factory():
  x = correlated_features(np.random.default_rng(5), 2 * 8 * 8, 12).reshape(2, 8, 8, 12)
  norm = normalizers.make('phi_s', 12, stats=stats_of(x))
  y = norm(jnp.asarray(x))
  assert y.shape == x.shape
  np.testing.assert_allclose(np.diag(channel_cov(y)), 1.0, rtol=1e-5)


def test_givens_equalizer_balances_spread_eigenvalues():
  eigenvalues = np.geomspace(1e-4, 1e4, 9)
  r = normalizers.givens_equalizer(eigenvalues)
  np.testing.assert_allclose(r @ r.T, np.eye(9), atol=1e-12)
  np.testing.assert_allclose(np.diag(r @ np.diag(eigenvalues) @ r.T), eigenvalues.mean(),
                             rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# factory and variables


def test_make_rejects_unknown_names_and_mismatched_stats():
  with pytest.raises(ValueError, match="'pca'.*allowed: none, zscore, ema_zscore, phi_s"):
    normalizers.make('pca', 4)
  with pytest.raises(ValueError, match='3 channels'):
    normalizers.make('zscore', 4, stats=stats_of(np.ones((2, 3))))
  with pytest.raises(ValueError, match='3 channels'):
    normalizers.make('zscore', 4)(jnp.ones((2, 3)))


@pytest.mark.parametrize('name', ['zscore', 'ema_zscore', 'phi_s'])
def test_statistics_are_non_trainable_norm_stats_with_axes(name):
  norm = normalizers.make(name, 8)
  assert not jax.tree.leaves(nnx.state(norm, nnx.Param))
  variables = jax.tree.leaves(nnx.state(norm, NormStats),
                              is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert variables and not any(isinstance(v, nnx.Param) for v in variables)
  for variable in variables:
    assert layers.logical_axes(variable) == (None,) * variable.ndim
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  for s in jax.tree.leaves(sharding.state_shardings(nnx.state(norm), {}, mesh)):
    assert s.is_fully_replicated
