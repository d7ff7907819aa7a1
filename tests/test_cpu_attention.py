"""The fused CPU attention kernel (`kivfm.kernels.attention`): forward and gradients equal the
softmax formula (float64 numpy) at odd lengths, Nq != Nk, fewer (batch, head) pairs than threads,
logits that would overflow `exp`, and a batch sharded over the 8 test devices; the plain path
uses it exactly without a bias on CPU (half precision widened to float32); the build is cached,
and a missing compiler, the switch, or a failing build are handled as documented."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from kivfm import backend
from kivfm.kernels import attention as cpu_attention
from kivfm.models import vit

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason='no C++ compiler / Eigen headers here')


def _reference(q, k, v, g):
  """float64 (output, (dq, dk, dv)) of softmax attention with output cotangent g."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bkhd->bqhd', p, v)
  dp = np.einsum('bqhd,bkhd->bhqk', g, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(q.shape[-1])
  return out, (np.einsum('bhqk,bkhd->bqhd', ds, k), np.einsum('bhqk,bqhd->bkhd', ds, q),
               np.einsum('bhqk,bqhd->bkhd', p, g))


def _inputs(b, nq, nk, h, d, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  normal = lambda n: jnp.asarray(rng.normal(size=(b, n, h, d)) * scale, jnp.float32)
  return normal(nq), normal(nk), normal(nk), normal(nq)


def _check(q, k, v, g, fn=cpu_attention.attention, tol=2e-5):
  out, grads = jax.jit(jax.value_and_grad(lambda q, k, v: (fn(q, k, v) * g).sum(), (0, 1, 2)))(
      q, k, v)
  want_out, want_grads = _reference(q, k, v, g)
  got_out = jax.jit(fn)(q, k, v)
  np.testing.assert_allclose(got_out, want_out, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out, (want_out * np.asarray(g)).sum(), rtol=1e-4)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=1e-4)


@pytest.mark.parametrize('shape', [
    (2, 5, 7, 3, 4),      # Nq != Nk, odd sizes
    (1, 65, 65, 1, 64),   # one (batch, head) pair: fewer work items than threads
    (3, 50, 50, 6, 16),
])
def test_equals_softmax_attention_forward_and_backward(shape):
  _check(*_inputs(*shape, seed=sum(shape)))


def test_large_logits_stay_finite_and_exact():
  # Integer q, k and Dh = 4: logits up to ~800 (exp overflows float32 past 88) and exact in
  # float32, so the float64 reference is a fair one.
  rng = np.random.default_rng(3)
  q, k = (jnp.asarray(rng.integers(-20, 21, size=(2, n, 2, 4)), jnp.float32) for n in (9, 11))
  _, _, v, g = _inputs(2, 9, 11, 2, 4, seed=3)
  _check(q, k, v, g, tol=1e-4)   # |dq| ~ 5: float32 cancellation in dP - rowsum(dO * O)


@pytest.mark.parametrize('mesh_shape,spec', [((8,), P('data')),
                                             ((2, 4), P('data', None, 'model'))])
def test_sharded_call_runs_per_shard_and_equals_the_formula(mesh_shape, spec):
  names = ('data', 'model')[:len(mesh_shape)]
  mesh = jax.make_mesh(mesh_shape, names, axis_types=(AxisType.Auto,) * len(names))   # kivfm's
  q, k, v, g = _inputs(8, 17, 17, 4, 8, seed=4)
  put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
  with jax.set_mesh(mesh):
    _check(*(put(x) for x in (q, k, v, g)))
  grad = jax.jit(jax.grad(lambda q, k, v: (cpu_attention.attention(q, k, v) * g).sum(),
                          (0, 1, 2)))
  with jax.set_mesh(mesh):
    hlo = grad.lower(put(q), put(k), put(v)).compile().as_text()
  calls = [line for line in hlo.splitlines() if 'custom-call(' in line]
  shard = f'f32[{8 // mesh_shape[0]},17,{4 // (mesh_shape + (1,))[1]},8]'
  assert len(calls) == 2 and all(shard in line for line in calls), calls
  assert 'all-gather' not in hlo   # no device computes another's (batch, head) pairs


def test_plain_attention_uses_the_kernel_without_bias_in_float32(monkeypatch):
  calls, kernel = [], cpu_attention.attention
  monkeypatch.setattr(cpu_attention, 'attention', lambda *a: calls.append(a) or kernel(*a))
  q, k, v, _ = _inputs(1, 6, 6, 2, 4, seed=5)
  vit._attend(q, k, v, jnp.zeros((1, 2, 6, 6)))
  assert not calls
  want = vit._attend(q, k, v)
  assert len(calls) == 1
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  got = vit._attend(*half)   # widened for the kernel, rounded back
  assert len(calls) == 2 and all(x.dtype == jnp.float32 for x in calls[1])
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)


def test_build_is_cached_per_source_and_reused(tmp_path, monkeypatch):
  monkeypatch.setenv('KIVFM_CACHE', str(tmp_path))
  compiler, eigen = 'g++', cpu_attention.eigen_dir()
  path = cpu_attention.build(compiler, eigen)
  assert path.startswith(str(tmp_path)) and os.path.isfile(path)
  stamp = os.stat(path).st_mtime_ns
  assert cpu_attention.build(compiler, eigen) == path and os.stat(path).st_mtime_ns == stamp
  source = tmp_path / 'broken.cc'
  source.write_text('this is not C++\n')
  monkeypatch.setattr(cpu_attention, 'SOURCE', str(source))
  assert cpu_attention.library_path(compiler) != path          # keyed by the source
  with pytest.raises(RuntimeError, match='broken.cc'):
    cpu_attention.build(compiler, eigen)
  assert not list((tmp_path / 'kernels').glob('*/*.so.tmp*'))  # no half-built file left


def test_switch_and_missing_compiler_fall_back_with_a_note(monkeypatch, capsys):
  try:
    cpu_attention.available.cache_clear()
    monkeypatch.setenv(cpu_attention.SWITCH, '0')
    assert not cpu_attention.available()
    assert capsys.readouterr().err == ''
    cpu_attention.available.cache_clear()
    monkeypatch.delenv(cpu_attention.SWITCH)
    monkeypatch.setattr(cpu_attention.shutil, 'which', lambda name: None)
    assert not cpu_attention.available()
    assert cpu_attention.INSTALL_HINT in capsys.readouterr().err
    q, k, v, _ = _inputs(1, 6, 6, 2, 4, seed=6)
    assert not cpu_attention.supported(q, k, v)
    np.testing.assert_allclose(vit._attend(q, k, v).reshape(q.shape),
                               _reference(q, k, v, q)[0], atol=1e-5)   # XLA's path
  finally:
    cpu_attention.available.cache_clear()
    monkeypatch.undo()
    assert cpu_attention.available()


def test_as_accelerator_traces_xla_attention_whose_flops_xla_counts():
  q, k, v, _ = _inputs(2, 16, 16, 2, 8, seed=7)
  # a fresh function per trace: jit caches traces per function, and `as_accelerator` is not
  # part of that cache's key
  flops = lambda: jax.jit(lambda *a: vit._attend(*a)).lower(q, k, v).cost_analysis()['flops']
  with backend.as_accelerator():
    counted = flops()
  assert counted >= 2 * 2 * (2 * 2 * 16 * 16 * 8)   # q k^T and p v
  assert flops() < counted / 10                      # the custom call counts as nothing
