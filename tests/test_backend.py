"""`kivfm.backend`: inside `as_accelerator` no XLA:CPU path is traced."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kivfm import backend
from kivfm.kernels import attention as cpu_attention
from kivfm.models import layers, vit

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the paths are XLA:CPU\'s')


def test_as_accelerator_leaves_out_every_cpu_path(monkeypatch):
  calls = []
  monkeypatch.setattr(layers, 'depthwise_conv',
                      lambda x, *a: calls.append('depthwise') or jnp.zeros_like(x))
  monkeypatch.setattr(cpu_attention, 'attention',
                      lambda q, k, v: calls.append('kernel') or jnp.zeros_like(q))
  monkeypatch.setattr(cpu_attention, 'available', lambda: True)
  q = jnp.ones((1, 300, 2, 4))   # past CPU_MATMUL_NORMALISER_KEYS
  half = jnp.ones((2, 8), jnp.bfloat16)
  conv = layers.Conv(4, 4, 3, groups=4, rngs=nnx.Rngs(0))
  # Fresh functions: traces are cached per function.
  dot_jaxpr = lambda: str(jax.make_jaxpr(lambda a, b: layers.dot(a, b))(half, half.T))
  barrier_bwd = lambda: str(jax.make_jaxpr(jax.grad(lambda x: layers.gradient_barrier(x).sum()))(
      jnp.ones(3)))
  with backend.as_accelerator(), backend.as_accelerator():   # nests
    assert not backend.cpu_paths()
    vit._attend(q, q, q)
    conv(jnp.ones((1, 6, 6, 4)))
    assert layers.dot(half, half.T).dtype == jnp.bfloat16 and 'f32' not in dot_jaxpr()
    assert 'cond' not in barrier_bwd()
    # No ones column for the normaliser.
    assert 'concatenate' not in str(jax.make_jaxpr(lambda q: vit._attend(q, q, q))(q))
  assert not calls
  assert backend.cpu_paths()
  vit._attend(q, q, q)
  conv(jnp.ones((1, 6, 6, 4)))
  assert calls == ['kernel', 'depthwise']
  assert 'f32' in dot_jaxpr() and 'cond' in barrier_bwd()


def test_as_accelerator_restores_on_error():
  with pytest.raises(ValueError), backend.as_accelerator():
    raise ValueError
  assert backend.cpu_paths()
  np.testing.assert_array_equal(layers.dot(jnp.ones((2, 2)), jnp.ones((2, 2))), 2 * np.ones((2, 2)))
