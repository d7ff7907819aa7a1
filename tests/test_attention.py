"""The memory-efficient attention paths of `kivfm.models.vit` against the plain one: 'blocked'
(flash-style chunks, custom VJP) and 'fused' (jax.nn.dot_product_attention, XLA on CPU) equal
'plain' in float32 forward and backward (q, k, v and SAM's relative-position tables), with and
without SAM's decomposed bias, on non-square grids and lengths no block size divides; the plain
path's CPU form (normaliser from the value matmul) equals its softmax form; windowed
attention is unaffected; 'auto' keeps the plain path for short sequences; the blocked path's
XLA temp memory at 4096 tokens is a small fraction of the plain one's; and the SAM parity
tests pass with the blocked path forced on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kivfm import config as config_lib
from kivfm.models import vit

TOL = 1e-5  # float32, relative to the largest magnitude of the compared array (at least 1)


def _close(got, want, label):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = max(1.0, float(jnp.abs(w).max()))
    err = float(jnp.abs(g - w).max()) / scale
    assert err <= TOL, (label, err, g.shape)


def _inputs(batch, grid, heads, dim, seed, rel_len=None):
  rng = np.random.default_rng(seed)
  n = grid[0] * grid[1]
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k, v = normal(batch, n, heads, dim), normal(batch, n, heads, dim), normal(batch, n, heads, dim)
  rel_h = normal(rel_len or 2 * grid[0] - 1, dim)
  rel_w = normal(rel_len or 2 * grid[1] - 1, dim)
  return q, k, v, rel_h, rel_w, normal(batch, n, heads * dim)


def _loss(impl, grid, bias, chunks):
  def loss(q, k, v, rel_h, rel_w, cotangent):
    rel_pos = (rel_h, rel_w, grid) if bias else None
    out = vit.attention(q, k, v, rel_pos, impl=impl, chunks=chunks)
    return jnp.sum(out * cotangent), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


@pytest.mark.parametrize('grid,bias,chunks,rel_len', [
    ((5, 10), False, (16, 24), None),    # 50 tokens: neither 16 nor 24 divides them
    ((7, 9), True, (16, 20), None),      # non-square grid; key blocks of 2 rows (18 keys), 7 rows
    ((6, 11), True, (64, 8), 15),        # a row per block (block < row); tables resized
])
def test_equals_plain_forward_and_gradients(grid, bias, chunks, rel_len):
  args = _inputs(2, grid, 3, 8, seed=sum(grid), rel_len=rel_len)
  (_, want), want_grads = _loss('plain', grid, bias, chunks)(*args)
  names = ('q', 'k', 'v', 'rel_h', 'rel_w') if bias else ('q', 'k', 'v')
  for impl in ('blocked', 'fused'):
    (_, got), grads = _loss(impl, grid, bias, chunks)(*args)
    _close(got, want, f'{impl} forward')
    for name, g, w in zip(names, grads, want_grads):
      _close(g, w, f'{impl} d{name}')


def test_blocked_bfloat16_close_to_plain():
  q, k, v, rel_h, rel_w, _ = (x.astype(jnp.bfloat16) for x in _inputs(1, (6, 7), 2, 16, 3))
  run = lambda impl: jax.jit(lambda q, k, v, h, w: vit.attention(
      q * 0.25, k, v, (h, w, (6, 7)), impl=impl, chunks=(16, 14)))(q, k, v, rel_h, rel_w)
  got, want = run('blocked'), run('plain')
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=3e-2)


def _uses_loop(fn, *shapes) -> bool:
  jaxpr = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
  return any(word in str(jaxpr) for word in ('scan', 'while'))


def test_auto_keeps_plain_for_short_sequences_and_blocks_long_ones():
  auto = lambda q, k, v: vit.attention(q, k, v)
  assert not _uses_loop(auto, *[(64, 257, 6, 64)] * 3)        # DINOv2 ViT-S/14 at 224 px
  assert not _uses_loop(auto, *[(64, 65, 6, 64)] * 3)         # ... at 112 px
  assert _uses_loop(auto, *[(1, 4096, 12, 64)] * 3)           # SAM global block at 1024 px
  sam = lambda q, k, v, h, w: vit.attention(q, k, v, (h, w, (64, 64)))
  assert _uses_loop(sam, *[(1, 4096, 12, 64)] * 3, (127, 64), (127, 64))
  window = lambda q, k, v, h, w: vit.attention(q, k, v, (h, w, (14, 14)))
  assert not _uses_loop(window, *[(25, 196, 12, 64)] * 3, (27, 64), (27, 64))
  # The plain path is the unchanged code: bit-identical results.
  q, k, v, *_ = _inputs(2, (4, 4), 2, 8, seed=0)
  np.testing.assert_array_equal(vit.attention(q, k, v), vit._attend(q, k, v))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_plain_cpu_normaliser_by_matmul_equals_softmax(monkeypatch, dtype):
  """On CPU, from `CPU_MATMUL_NORMALISER_KEYS` keys, the plain path takes its softmax normaliser
  from the value matmul (a ones column); elsewhere it calls jax.nn.softmax. Both give the same values and gradients, with SAM's bias,
  and logits large enough that an unguarded exp would overflow."""
  monkeypatch.setattr(vit, 'CPU_MATMUL_NORMALISER_KEYS', 30)
  q, k, v, rel_h, rel_w, cotangent = _inputs(2, (5, 6), 3, 8, seed=4)
  q = q * 12.0   # logits up to ~1e2: exp overflows float32 without the max

  def loss(q, k, v, rel_h, rel_w):
    out = vit.attention(q, k, v, (rel_h, rel_w, (5, 6)), impl='plain')
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  grad = lambda: jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
      *(x.astype(dtype) for x in (q, k, v, rel_h, rel_w)))
  (_, got), got_grads = grad()
  monkeypatch.setattr(vit.jax, 'default_backend', lambda: 'gpu')
  (_, want), want_grads = grad()
  assert got.dtype == dtype and bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
  if dtype == jnp.float32:
    _close(got, want, 'forward')
    _close(got_grads, want_grads, 'gradients')
  else:   # both round the weights / probabilities to bfloat16 before the value matmul
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=6e-2)


def _sam_attention(attention, window):
  """A SAM attention layer (relative positions, random tables) over a 6x7 token grid."""
  cfg = vit.ViTConfig(width=16, num_heads=2, pos_grid=(6, 7), class_token=False, window_size=3,
                      rel_pos=True)
  cfg = vit.with_attention(cfg, attention, chunks=(8, 16), auto_tokens=30)
  layer = vit.Attention(cfg, window=window, dtype=jnp.float32, param_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for table in (layer.rel_pos_h, layer.rel_pos_w):  # SAM's tables start at zero
    table[...] = jnp.asarray(rng.normal(size=table.shape) * 0.5, jnp.float32)
  return layer


@pytest.mark.parametrize('window', [3, 0])
def test_sam_attention_layer_windowed_and_global(window):
  """SAM's attention layer, padded 3x3 windows and global: 'blocked' (under jax.checkpoint, as
  remat runs it) gives the plain forward and parameter gradients; 'auto' (30 tokens) blocks the
  global layer and leaves the windowed one on the plain code, bit for bit."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 42, 16)), jnp.float32)

  def run(attention, remat=False):
    graphdef, state = nnx.split(_sam_attention(attention, window))
    def loss(state):
      out = nnx.merge(graphdef, state)(x, (6, 7))
      return jnp.sum(jnp.sin(out)), out
    return jax.jit(jax.grad(jax.checkpoint(loss) if remat else loss, has_aux=True))(state)

  (want_grads, want), (grads, got) = run('plain'), run('blocked', remat=True)
  _close(got, want, 'forward')
  _close(grads, want_grads, 'parameter gradients')
  auto, plain = _sam_attention('auto', window), _sam_attention('plain', window)
  assert _uses_loop(lambda t: auto(t, (6, 7)), x.shape) == (not window)
  if window:
    forward = lambda layer: jax.jit(lambda t: layer(t, (6, 7)))(x)
    np.testing.assert_array_equal(forward(auto), forward(plain))


def test_blocked_temp_memory_at_4096_tokens():
  """XLA's temp buffers of one SAM-style global attention (64x64 grid, relative positions),
  forward and forward + backward: the blocked path needs a small fraction of the plain one."""
  grid, n = (64, 64), 4096
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  args = (spec(1, n, 2, 16), spec(1, n, 2, 16), spec(1, n, 2, 16), spec(127, 16), spec(127, 16))

  def temp(impl, backward):
    def f(q, k, v, rel_h, rel_w):
      return vit.attention(q, k, v, (rel_h, rel_w, grid), impl=impl, chunks=(256, 512))
    if backward:
      f = jax.grad(lambda *a, f=f: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4))
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

  logits = 2 * n * n * 4  # one [1, 2, N, N] float32 array
  for backward in (False, True):
    plain, blocked = temp('plain', backward), temp('blocked', backward)
    assert plain >= logits, (backward, plain)
    assert blocked < plain / 4 and blocked < logits / 4, (backward, plain, blocked)


def test_sam_parity_with_blocked_attention(monkeypatch):
  """tests/test_vit_parity.py's SAM parity against HF transformers, blocked path forced on
  (small chunks, so the global layers span several query chunks and key blocks)."""
  pytest.importorskip('transformers')
  import test_vit_parity
  from kivfm.teachers import vit_port
  original, used = vit_port.config_from_hf, []

  def blocked_config(*args, **kwargs):
    cfg = vit.with_attention(original(*args, **kwargs), 'blocked', chunks=(16, 16))
    used.append(cfg.attention)
    return cfg

  monkeypatch.setattr(vit_port, 'config_from_hf', blocked_config)
  for name in test_vit_parity.SAM:
    test_vit_parity.test_sam(name)
  assert used == ['blocked'] * len(test_vit_parity.SAM)


def test_config_attention_keys_are_validated():
  config = config_lib.load('configs/base.py:smoke')
  config_lib.validate(config, 8)
  config.attention.impl = 'flash'
  with pytest.raises(config_lib.ConfigError, match=r'config\.attention\.impl=.*auto, plain'):
    config_lib.validate(config, 8)
  config.attention.impl = 'blocked'
  config.attention.chunks = (0, 512)
  with pytest.raises(config_lib.ConfigError, match=r'config\.attention\.chunks'):
    config_lib.validate(config, 8)
  config.attention.chunks = (128, 256)
  arch = vit.with_attention(vit.ViTConfig(), **config.attention)
  assert (arch.attention, arch.attention_chunks, arch.attention_auto_tokens) == (
      'blocked', (128, 256), 1024)
  assert repr(arch) == repr(vit.ViTConfig())  # not architecture: weight-cache keys unchanged
  assert vit.with_attention('not a vit config', 'blocked') == 'not a vit config'


def test_config_attention_reaches_every_built_vit_and_leaves_cnns_alone():
  from kivfm import assembly, sharding
  config = config_lib.load('configs/base.py:smoke')
  config.attention.update(impl='blocked', chunks=(16, 32))
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    teacher_set = assembly.build_teachers(config, mesh)
  for spec in teacher_set.specs.values():
    assert (spec.arch.attention, spec.arch.attention_chunks) == ('blocked', (16, 32))
  cnn = object()
  assert vit.with_attention(cnn, 'blocked') is cnn
