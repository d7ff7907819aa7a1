"""Layers written for XLA:CPU speed compute exactly what the plain formulations compute."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kivfm.models import layers, vit


def grouped_conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=x.shape[-1])


@pytest.mark.parametrize('size,kernel,stride,padding', [
    (9, 3, 1, 'SAME'), (9, 3, 2, 'SAME'), (10, 5, 2, 'SAME'), (8, 5, 1, 'VALID'),
    (7, 3, 2, ((1, 1), (0, 2))), ((6, 11), 3, 2, 'SAME')])
def test_depthwise_conv_equals_grouped_convolution_forward_and_backward(size, kernel, stride,
                                                                        padding):
  h, w = (size, size) if isinstance(size, int) else size
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, h, w, 6)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
  mine = layers.depthwise_conv(x, k, stride, padding)
  ref = grouped_conv(x, k, stride, padding)
  assert mine.shape == ref.shape
  np.testing.assert_allclose(mine, ref, atol=1e-5)
  loss = lambda f: lambda x, k: (f(x, k, stride, padding) * jnp.cos(ref)).sum()
  for a, b in zip(jax.grad(loss(layers.depthwise_conv), (0, 1))(x, k),
                  jax.grad(loss(grouped_conv), (0, 1))(x, k)):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_conv_layer_takes_the_depthwise_path_only_for_depthwise_kernels(monkeypatch):
  calls = []
  monkeypatch.setattr(layers, 'depthwise_conv',
                      lambda *a: calls.append(a) or grouped_conv(a[0], a[1], a[2], a[3]))
  x = jnp.ones((1, 8, 8, 4))
  layers.Conv(4, 4, 3, groups=4, rngs=nnx.Rngs(0))(x)
  layers.Conv(4, 8, 3, rngs=nnx.Rngs(0))(x)
  assert len(calls) == (1 if jax.default_backend() == 'cpu' else 0)


def test_matmul_gradients_equal_jnp_dot():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
  np.testing.assert_allclose(layers.matmul(x, w), jnp.dot(x, w), atol=1e-6)
  loss = lambda f: lambda x, w: (f(x, w) * g).sum()
  for a, b in zip(jax.grad(loss(layers.matmul), (0, 1))(x, w),
                  jax.grad(loss(jnp.dot), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_half_precision_products_ask_for_float32_results_on_cpu():
  """bf16 dots, matmul gradients and convolutions: float32 results (XLA:CPU's AMX path)
  rounded back to bf16, equal to the float32 product of the same operands rounded once."""
  cpu = jax.default_backend() == 'cpu'
  rng = np.random.default_rng(3)
  half = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  x, w, g = half(3, 5, 64), half(64, 7), half(3, 5, 7)
  wide = lambda a: a.astype(jnp.float32)
  hlo = jax.jit(layers.dot).lower(x, w).as_text()
  assert ('tensor<3x5x7xf32>' in hlo) == cpu, hlo   # the product's float32 result
  got = layers.matmul(x, w)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(wide(got), wide(jnp.dot(wide(x), wide(w)).astype(jnp.bfloat16)),
                             rtol=2 ** -7)
  dx, dw = jax.grad(lambda x, w: (wide(layers.matmul(x, w)) * wide(g)).sum(), (0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(wide(dw), wide(jnp.einsum('abk,abn->kn', wide(x), wide(g))),
                             rtol=2 ** -7, atol=1e-2)
  conv = layers.Conv(4, 8, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  images = half(2, 6, 6, 4)
  assert ('f32' in str(jax.make_jaxpr(conv)(images))) == cpu
  assert conv(images).dtype == jnp.bfloat16
  assert layers.float32_results(jnp.ones(2, jnp.float16)) == cpu
  assert not layers.float32_results(jnp.ones(2, jnp.float32), jnp.ones(2, jnp.bfloat16))


def test_gelu_is_the_exact_formula():
  x = np.linspace(-12, 12, 4801)
  want = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  slope = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(
      2 * math.pi)
  got = layers.gelu(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x, jnp.float32)), slope,
                             rtol=0, atol=2e-6)
  assert layers.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_plain_attention_equals_the_softmax_formula():
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 3, 4)), jnp.float32) for n in (5, 7, 7))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / 2.0
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = np.einsum('bhqk,bkhd->bqhd', probs, v).reshape(2, 5, 12)
  np.testing.assert_allclose(vit._attend(q, k, v), expected, atol=1e-5)


def _largest_fusion_of_adapter_gradient(depth: int) -> int:
  """Most operands of any fusion in the compiled gradient of a `depth`-block adapted ViT."""
  from kivfm.models import adapters
  cfg = vit.ViTConfig(width=32, depth=depth, mlp_dim=64, patch_size=8, pos_grid=(2, 2),
                      num_heads=2)
  model = vit.ViT(cfg, rngs=nnx.Rngs(0))
  adapters.attach(model, 'bottleneck', dim=8, rngs=nnx.Rngs(1))
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  loss = lambda p, x: (nnx.merge(graph, p, rest)(x)['patches'] ** 2).sum()
  hlo = jax.jit(jax.grad(loss)).lower(params, jnp.ones((2, 16, 16, 3))).compile().as_text()
  return max(line.split(' fusion(')[1].split(')')[0].count('%')
             for line in hlo.splitlines() if ' fusion(' in line)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the barrier acts on XLA:CPU only')
def test_gradient_barrier_keeps_backward_fusions_independent_of_depth(monkeypatch):
  barred = [_largest_fusion_of_adapter_gradient(d) for d in (2, 8)]
  assert barred[1] <= barred[0] + 2, barred
  monkeypatch.setattr(layers, 'gradient_barrier', lambda x: x)
  assert _largest_fusion_of_adapter_gradient(8) > 2 * barred[1]   # the chain it prevents


def test_gradient_barrier_is_the_identity_and_passes_nan_on():
  x = jnp.arange(6.0).reshape(2, 3)
  f = lambda x: (jnp.sin(layers.gradient_barrier(x * x)) * x).sum()
  plain = lambda x: (jnp.sin(x * x) * x).sum()
  np.testing.assert_array_equal(layers.gradient_barrier(x), x)
  np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(plain)(x), rtol=1e-6)
  nan_first = jax.grad(lambda x: (layers.gradient_barrier(x) * jnp.array([jnp.nan, 1.0])).sum())
  assert np.isnan(np.asarray(jax.jit(nan_first)(jnp.ones(2)))).all()
