"""One configurable Vision Transformer: DINOv2 (defaults), DINOv3, CLIP, SigLIP / SigLIP2, SAM by
options.

Output contract (a dict):
  'cls'      [B, D] global vector: the class token after the final norm (DINOv2 / DINOv3: HF
             `pooler_output`;
             CLIP: `post_layernorm(class token)` = HF `pooler_output`), the attention-pooling head
             output (SigLIP: HF `pooler_output`), else the mean of the patch tokens (SAM);
  'patches'  [B, h, w, D] patch tokens of the last layer as HF's `last_hidden_state` gives them:
             after the final norm for DINOv2 / DINOv3 / SigLIP, WITHOUT a norm for CLIP (HF applies
             `post_layernorm` to the class token only) and SAM (before the neck);
  'hidden'   tuple of [B, N, D] token sequences after the blocks listed in `return_layers`
             (HF `hidden_states[i + 1]`);
  'embedding' [B, E] image embedding of the image-text space, unnormalised (CLIP: visual
             projection of 'cls'; SigLIP: the pooled 'cls'), only for those families;
  'neck'     [B, h, w, C] SAM neck output (HF SAM vision encoder `last_hidden_state`, NHWC).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kivfm import backend
from kivfm.kernels import attention as cpu_attention
from kivfm.models import layers

POS_INTERP = ('bicubic', 'bicubic_aa', 'bilinear_aa')
ATTENTION = ('auto', 'plain', 'blocked', 'fused')  # see `attention`


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a ViT; the defaults are DINOv2 ViT-S/14 (HF `Dinov2Model`)."""
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536                    # SwiGLU: the hidden width of one branch
  patch_size: int = 14
  pos_grid: tuple[int, int] = (37, 37)   # grid the position embeddings are stored for
  act: str = 'gelu'                      # gelu | gelu_tanh | quick_gelu | swiglu
  norm_eps: float = 1e-6
  qkv_bias: bool = True
  key_bias: bool = True                  # the key's bias, when qkv_bias (DINOv3: False)
  patch_bias: bool = True                # CLIP: False
  class_token: bool = True
  num_registers: int = 0
  layerscale: float | None = 1.0         # init value of LayerScale; None = no LayerScale
  pre_norm: bool = False                 # LayerNorm on the embeddings (CLIP `pre_layrnorm`)
  final_norm: bool = True                # LayerNorm on every output token (DINOv2, SigLIP)
  cls_norm: bool = False                 # LayerNorm on 'cls' only (CLIP `post_layernorm`)
  pos_embed_cls: bool = True             # the table holds a class position (when class_token)
  # DINOv3: rotary position embeddings of this base period on the patch tokens' queries and keys
  # (`rope_tables`) instead of a learned table (then there is no `pos_embed`, and `pos_grid` and
  # `pos_interp*` are unused). None: a learned table.
  rope_theta: float | None = None
  # Resizing of the stored position grid, as torch F.interpolate(align_corners=False) does it:
  # 'bicubic' (a=-0.75; DINOv2, CLIP, SigLIP, SAM off its grid; = ONNX Resize cubic half_pixel),
  # 'bicubic_aa' (antialias=True; HF DINOv2 with registers), 'bilinear_aa' (SigLIP2 NaFlex).
  pos_interp: str = 'bicubic'
  pos_interp_offset: float = 0.0         # original DINOv2 repo: 0.1 (scale_factor=(n + 0.1) / M)
  window_size: int = 0                   # SAM: windowed attention outside `global_layers`
  global_layers: tuple[int, ...] = ()
  rel_pos: bool = False                  # SAM: decomposed relative position embeddings
  map_head: bool = False                 # SigLIP: attention-pooling head -> 'cls', 'embedding'
  proj_dim: int | None = None            # CLIP: visual projection (no bias) -> 'embedding'
  neck_dim: int | None = None            # SAM: conv1x1-LN-conv3x3-LN neck -> 'neck'
  # How attention is computed (`attention`): equal results, different memory and speed. Not
  # architecture, so left out of the repr (which keys the converted-weight cache).
  # 'auto': 'fused' (cuDNN) without a bias on GPU in half precision, else 'blocked' when a
  # sequence (or window) has more than `attention_auto_tokens` tokens, else 'plain'.
  attention: str = dataclasses.field(default='auto', repr=False)
  attention_chunks: tuple[int, int] = dataclasses.field(default=(256, 512), repr=False)
  attention_auto_tokens: int = dataclasses.field(default=1024, repr=False)

  def __post_init__(self):
    if self.pos_interp not in POS_INTERP:
      raise ValueError(f'pos_interp {self.pos_interp!r}; allowed: {", ".join(POS_INTERP)}')
    if self.attention not in ATTENTION:
      raise ValueError(f'attention {self.attention!r}; allowed: {", ".join(ATTENTION)}')
    if len(self.attention_chunks) != 2 or min(self.attention_chunks) < 1:
      raise ValueError(f'attention_chunks {self.attention_chunks!r}: (queries per chunk, keys '
                       f'per block), both >= 1')
    if self.rope_theta is not None and (self.head_dim % 4 or self.window_size or self.rel_pos):
      raise ValueError(f'rotary position embeddings need a head width divisible by 4 (got '
                       f'{self.head_dim}) and global attention without relative positions')
    spatial = self.window_size or self.rel_pos
    if spatial and (self.class_token or self.num_registers):
      raise ValueError('windowed attention and relative positions need patch tokens only '
                       '(class_token=False, num_registers=0)')

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def num_pos_extra(self) -> int:
    """Position-table rows before the patch grid (the class position)."""
    return int(self.class_token and self.pos_embed_cls)


def with_attention(arch, impl: str = 'auto', chunks: tuple[int, int] = (256, 512),
                   auto_tokens: int = 1024):
  """`arch` computing attention by `impl` (`config.attention`: `with_attention(arch,
  **config.attention)`); configs of other model families are returned unchanged."""
  if not isinstance(arch, ViTConfig):
    return arch
  return dataclasses.replace(arch, attention=impl, attention_chunks=tuple(chunks),
                             attention_auto_tokens=auto_tokens)


# ----------------------------------------------------------------------------------- resizing


def _cubic(x: float, a: float) -> float:
  """Keys' cubic convolution kernel."""
  x = abs(x)
  if x < 1:
    return ((a + 2) * x - (a + 3)) * x * x + 1
  if x < 2:
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return 0.0


def _triangle(x: float) -> float:
  return max(0.0, 1.0 - abs(x))


# name -> (kernel, taps). torch's bicubic uses a=-0.75, its antialiased bicubic a=-0.5 (as PIL).
_KERNELS = {'bicubic': (lambda x: _cubic(x, -0.75), 4), 'linear': (_triangle, 2),
            'bicubic_aa': (lambda x: _cubic(x, -0.5), 4), 'bilinear_aa': (_triangle, 2)}


def resize_matrix(in_size: int, out_size: int, method: str = 'bicubic',
                  offset: float = 0.0) -> np.ndarray:
  """[out, in] matrix of torch `F.interpolate(align_corners=False)` along one axis.

  'bicubic' / 'linear': taps around the half-pixel source coordinate, indices clamped to the edge.
  'bicubic_aa' / 'bilinear_aa': antialias=True, the kernel stretched by the scale when
  downsampling and its weights normalised. `offset`: the scale is in / (out + offset), as
  `scale_factor=(out + offset) / in` gives it.
  """
  kernel, taps = _KERNELS[method]
  scale = in_size / (out_size + offset)
  m = np.zeros((out_size, in_size), np.float64)
  if not method.endswith('_aa'):
    for o in range(out_size):
      src = (o + 0.5) * scale - 0.5
      first = math.floor(src) - taps // 2 + 1
      for j in range(first, first + taps):
        m[o, min(max(j, 0), in_size - 1)] += kernel(src - j)
    return m
  stretch = max(scale, 1.0)
  support = taps / 2 * stretch
  for o in range(out_size):
    center = scale * (o + 0.5)
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
    w = np.array([kernel((j - center + 0.5) / stretch) for j in range(lo, hi)])
    m[o, lo:hi] = w / w.sum()
  return m


def resize_pos_embed(grid: jax.Array, size: tuple[int, int], method: str = 'bicubic',
                     offset: float = 0.0) -> jax.Array:
  """Resizes a [gh, gw, D] position-embedding grid to `size` exactly as torch does (float32)."""
  if tuple(grid.shape[:2]) == tuple(size):
    return grid
  mh = jnp.asarray(resize_matrix(grid.shape[0], size[0], method, offset), jnp.float32)
  mw = jnp.asarray(resize_matrix(grid.shape[1], size[1], method, offset), jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  out = jnp.einsum('oh,hwd->owd', mh, grid.astype(jnp.float32), precision=hp)
  return jnp.einsum('pw,owd->opd', mw, out, precision=hp).astype(grid.dtype)


# ------------------------------------------------------------------------------ rotary positions


@functools.lru_cache(maxsize=64)  # every block of a trace asks for the same tables
def rope_tables(grid: tuple[int, int], head_dim: int,
                theta: float) -> tuple[np.ndarray, np.ndarray]:
  """DINOv3's 2-D rotary embedding: (sin, cos) [h * w, head_dim] float32 for a patch grid.

  Patch centres have coordinates in [-1, 1], rows and columns each scaled by their own length
  (DINOv3 'separate'); head_dim / 4 frequencies 1 / theta^(4 i / head_dim) per axis; the angles
  2 pi coord freq are laid out [rows' | columns'] and repeated twice along the head."""
  h, w = grid
  centres = lambda n: (np.arange(n) + 0.5) / n * 2 - 1
  coords = np.stack(np.meshgrid(centres(h), centres(w), indexing='ij'), -1).reshape(h * w, 2)
  inv_freq = 1 / theta ** (np.arange(head_dim // 4) * 4 / head_dim)
  angles = 2 * np.pi * (coords[:, :, None] * inv_freq).reshape(h * w, head_dim // 2)
  angles = np.tile(angles, 2)
  return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rope(x: jax.Array, sin: np.ndarray, cos: np.ndarray) -> jax.Array:
  """Rotates the last len(sin) tokens of heads x [B, N, H, Dh] (the patches; class and register
  tokens in front stay as they are), in float32 as DINOv3 does."""
  prefix = x.shape[1] - sin.shape[0]
  patches = x[:, prefix:].astype(jnp.float32)
  first, second = jnp.split(patches, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  patches = patches * cos[:, None] + rotated * sin[:, None]
  return jnp.concatenate([x[:, :prefix], patches.astype(x.dtype)], axis=1)


# ---------------------------------------------------------------------------------- attention


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


# Keys from which the plain path on CPU takes its softmax normaliser from the value matmul.
# Measured (train step of benchmarks/step.py, 2-core Xeon): 65 keys 5% slower, 145 the same,
# 226 5% faster, 257 (B64, 224 px) 1.27x faster.
CPU_MATMUL_NORMALISER_KEYS = 200


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Softmax attention over [B, N, H, Dh] heads (float32 softmax) -> [B, Nq, H * Dh].
  Materialises the [B, H, Nq, Nk] logits: the 'plain' path. Without a bias, on CPU the fused
  float32 kernel `kivfm.kernels.attention` runs instead (2.5x faster at 257 tokens, forward and
  backward; half-precision operands are widened for it), materialising one [Nq, Nk] block per
  thread."""
  if bias is None and cpu_attention.supported(q, k, v):
    out = cpu_attention.attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    return out.reshape(*out.shape[:2], -1).astype(v.dtype)
  # Heads-major operands: batched matmuls with leading batch dimensions, which XLA:CPU runs
  # about 2.5x faster than the same einsums over [B, N, H, Dh] (no effect on GPU / TPU).
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k) / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  logits = logits.astype(jnp.float32)
  if not backend.cpu_paths() or k.shape[2] < CPU_MATMUL_NORMALISER_KEYS:
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bhkd->bqhd', probs, v)
    return out.reshape(*out.shape[:2], -1)
  # On XLA:CPU, reductions over a long key axis (the softmax's sum forward, its sum(p * dp)
  # backward) are slow tree reductions; a ones column appended to the values makes the value
  # matmul compute the normaliser too. The max only guards exp against overflow; the result does
  # not depend on it, so no gradient flows through it.
  weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
  out = jnp.einsum('bhqk,bhkd->bqhd', weights.astype(v.dtype), v1,
                   preferred_element_type=jnp.float32)
  out = (out[..., :-1] / out[..., -1:]).astype(v.dtype)
  return out.reshape(*out.shape[:2], -1)


def _rel_pos_table(table: jax.Array, size: int) -> jax.Array:
  """[L, Dh] relative table -> [size, size, Dh] per (query, key); linear resize if L != 2size-1."""
  length = 2 * size - 1
  if table.shape[0] != length:
    m = jnp.asarray(resize_matrix(table.shape[0], length, 'linear'), table.dtype)
    table = jnp.einsum('ol,ld->od', m, table, precision=jax.lax.Precision.HIGHEST)
  idx = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
  return table[idx]


def rel_pos_bias(q: jax.Array, rel_h: jax.Array, rel_w: jax.Array,
                 grid: tuple[int, int]) -> jax.Array:
  """Decomposed relative-position logits (MViTv2 / SAM): queries [B, h*w, H, Dh] -> [B, H, N, N]."""
  (h, w), (b, n, heads, dh) = grid, q.shape
  qg = q.reshape(b, h, w, heads, dh)
  bias_h = jnp.einsum('bxyhc,xkc->bhxyk', qg, _rel_pos_table(rel_h, h))
  bias_w = jnp.einsum('bxyhc,ykc->bhxyk', qg, _rel_pos_table(rel_w, w))
  return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, heads, n, n)


# Blocked (flash-style) attention. Queries go in chunks (an outer scan), keys in blocks (an
# inner scan) under an online float32 softmax (running max m, sum l, weighted values acc), so no
# [Nq, Nk] array exists, forward or backward: the backward is a custom VJP (FlashAttention-2's),
# keeping q, k, v, the output and the log-sum-exp and recomputing each block's probabilities
# once. Chunks are sliced from, and written into, whole [B, N, H, Dh] arrays (no stacked copies).
# SAM's decomposed relative positions are computed per query chunk from that chunk only: with
# the per-(query, key) tables Th [h, h, Dh] and Tw [w, w, Dh] (`_rel_pos_table`), query n at
# (x, y) gets bias_h[n, i] = q_n . Th[x, i] and bias_w[n, j] = q_n . Tw[y, j] ([chunk, h] and
# [chunk, w]); a key block is `rows` whole key rows, so its bias is bias_h[:, rows] (+) bias_w.
_F32 = jnp.float32


def _even(n: int, most: int) -> tuple[int, int]:
  """(size, count) of the fewest pieces of at most `most` covering n, evened out so the zero
  padding stays below `count` (257 tokens by 256: 2 x 129, not 2 x 256)."""
  count = -(-n // max(most, 1))
  return -(-n // count), count


def _block_layout(nq: int, nk: int, key_w: int, chunks: tuple[int, int]):
  """(query chunk, #chunks, key rows per block (0: no bias), key block, #blocks)."""
  qc, nqc = _even(nq, chunks[0])
  if key_w:  # whole key rows per block, at least one
    rows, nkb = _even(nk // key_w, chunks[1] // key_w)
    return qc, nqc, rows, rows * key_w, nkb
  kb, nkb = _even(nk, chunks[1])
  return qc, nqc, 0, kb, nkb


def _pad_tokens(x: jax.Array, length: int) -> jax.Array:
  """Zero-pads axis 1 (tokens) to `length`; no copy when it is already that long."""
  if x.shape[1] == length:
    return x
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])) + ((0, 0),) * (x.ndim - 2))


def _chunk_tables(tables, start: int, qc: int):
  """The rows of the per-(query, key) tables for queries start..start+qc: ([qc, h, Dh],
  [qc, w, Dh], query rows x, query columns y). Past the grid (padding) x is clamped."""
  th, tw = tables
  n = start + jnp.arange(qc)
  x, y = jnp.minimum(n // tw.shape[0], th.shape[0] - 1), n % tw.shape[0]
  return th[x], tw[y], x, y


def _chunk_bias(qb: jax.Array, th_q: jax.Array, tw_q: jax.Array):
  """Relative-position factors of a query chunk [B, qc, H, Dh]: ([B, H, qc, h], [B, H, qc, w])."""
  f = lambda t: jnp.einsum('bqhc,qkc->bhqk', qb, t, preferred_element_type=_F32)
  return f(th_q), f(tw_q)


def _block_logits(qb, kb, bias, j, layout, nk):
  """float32 logits [B, H, qc, kb] of a query chunk against key block j: scaled, biased, and
  -inf on the zero-padded keys past nk."""
  _, _, rows, size, _ = layout
  s = jnp.einsum('bqhd,bkhd->bhqk', qb, kb, preferred_element_type=_F32) / math.sqrt(qb.shape[-1])
  if bias is not None:
    bh, bw = bias
    bh = jax.lax.dynamic_slice_in_dim(bh, j * rows, rows, axis=-1)
    s = s + (bh[..., :, None] + bw[..., None, :]).reshape(s.shape)
  if nk % size:
    s = jnp.where(j * size + jnp.arange(size) < nk, s, -jnp.inf)
  return s


def _blocked_setup(q, k, v, tables, chunks):
  nq, nk = q.shape[1], k.shape[1]
  layout = _block_layout(nq, nk, 0 if tables is None else tables[1].shape[0], chunks)
  qc, nqc, rows, size, nkb = layout
  kp, vp = _pad_tokens(k, nkb * size), _pad_tokens(v, nkb * size)
  key_block = lambda x, j: jax.lax.dynamic_slice_in_dim(x, j * size, size, axis=1)
  q_chunk = lambda x, c: jax.lax.dynamic_slice_in_dim(x, c * qc, qc, axis=1)

  def bias_of(qb, c):
    if tables is None:
      return None, None
    th_q, tw_q, x, y = _chunk_tables(tables, c * qc, qc)
    bh, bw = _chunk_bias(qb, th_q, tw_q)
    if nkb * rows > bh.shape[-1]:  # key rows padded to whole blocks (their keys are masked)
      bh = jnp.pad(bh, ((0, 0),) * 3 + ((0, nkb * rows - bh.shape[-1]),))
    return (bh, bw), (th_q, tw_q, x, y)

  return layout, kp, vp, key_block, q_chunk, bias_of


def _blocked_forward(q, k, v, tables, chunks):
  """q, k, v [B, N, H, Dh]; tables ([h, h, Dh], [w, w, Dh]) or None ->
  (out [B, Nq, H, Dh] in v.dtype, log-sum-exp [B, H, Nq] float32)."""
  b, nq, heads, dh = q.shape
  layout, kp, vp, key_block, q_chunk, bias_of = _blocked_setup(q, k, v, tables, chunks)
  qc, nqc, _, _, nkb = layout
  qp = _pad_tokens(q, nqc * qc)

  def chunk(carry, c):
    out, lse = carry
    qb = q_chunk(qp, c)
    bias, _ = bias_of(qb, c)

    def step(state, j):
      m, l, acc = state
      s = _block_logits(qb, key_block(kp, j), bias, j, layout, k.shape[1])
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum('bhqk,bkhd->bhqd', p.astype(v.dtype), key_block(vp, j),
                      preferred_element_type=_F32)
      return (m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv), None

    shape = (b, heads, qc)
    init = (jnp.full(shape, -jnp.inf, _F32), jnp.zeros(shape, _F32),
            jnp.zeros((*shape, dh), _F32))
    (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(nkb))
    o = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(v.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, o, c * qc, axis=1)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), c * qc, axis=2)
    return (out, lse), None

  init = (jnp.zeros((b, nqc * qc, heads, dh), v.dtype), jnp.zeros((b, heads, nqc * qc), _F32))
  (out, lse), _ = jax.lax.scan(chunk, init, jnp.arange(nqc))
  return out[:, :nq], lse[..., :nq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, tables, chunks):
  return _blocked_forward(q, k, v, tables, chunks)[0]


def _blocked_fwd(q, k, v, tables, chunks):
  out, lse = _blocked_forward(q, k, v, tables, chunks)
  return out, (q, k, v, tables, out, lse)


def _blocked_bwd(chunks, res, dout):
  """FlashAttention-2's backward: per query chunk and key block, p = exp(s - lse) and
  ds = p * (dout . v - rowsum(dout * out)); dq, dk, dv (float32) and, through the chunk's
  relative-position factors, the tables' cotangents accumulate."""
  q, k, v, tables, out, lse = res
  b, nq, heads, dh = q.shape
  layout, kp, vp, key_block, q_chunk, bias_of = _blocked_setup(q, k, v, tables, chunks)
  qc, nqc, rows, size, nkb = layout
  scale = 1 / math.sqrt(dh)
  pad_q = lambda x: _pad_tokens(x, nqc * qc)
  qp, dop = pad_q(q), pad_q(dout)
  lsep = jnp.pad(lse, ((0, 0), (0, 0), (0, nqc * qc - nq)))
  delta = jnp.einsum('bqhd,bqhd->bhq', dop.astype(_F32), pad_q(out).astype(_F32))

  def chunk(carry, c):
    dq_all, dk_all, dv_all, dtables = carry
    qb, dob = q_chunk(qp, c), q_chunk(dop, c)
    lseb = jax.lax.dynamic_slice_in_dim(lsep, c * qc, qc, axis=2)
    deltab = jax.lax.dynamic_slice_in_dim(delta, c * qc, qc, axis=2)
    bias, rel = bias_of(qb, c)

    def step(state, j):
      dq, dbias, dk_all, dv_all = state
      kb, vb = key_block(kp, j), key_block(vp, j)
      p = jnp.exp(_block_logits(qb, kb, bias, j, layout, k.shape[1]) - lseb[..., None])
      dv = jnp.einsum('bhqk,bqhd->bkhd', p.astype(dob.dtype), dob, preferred_element_type=_F32)
      dp = jnp.einsum('bqhd,bkhd->bhqk', dob, vb, preferred_element_type=_F32)
      ds = p * (dp - deltab[..., None])
      dq = dq + jnp.einsum('bhqk,bkhd->bqhd', ds.astype(kb.dtype), kb,
                           preferred_element_type=_F32) * scale
      dk = jnp.einsum('bhqk,bqhd->bkhd', ds.astype(qb.dtype), qb,
                      preferred_element_type=_F32) * scale
      add = lambda acc, d: jax.lax.dynamic_update_slice_in_dim(
          acc, key_block(acc, j) + d, j * size, axis=1)
      dk_all, dv_all = add(dk_all, dk), add(dv_all, dv)
      if bias is not None:
        dbh, dbw = dbias
        ds = ds.reshape(*ds.shape[:3], rows, -1)
        old = jax.lax.dynamic_slice_in_dim(dbh, j * rows, rows, axis=-1)
        dbias = (jax.lax.dynamic_update_slice_in_dim(dbh, old + ds.sum(-1), j * rows, axis=-1),
                 dbw + ds.sum(-2))
      return (dq, dbias, dk_all, dv_all), None

    dbias = None if bias is None else tuple(jnp.zeros(t.shape, _F32) for t in bias)
    init = (jnp.zeros((b, qc, heads, dh), _F32), dbias, dk_all, dv_all)
    (dq, dbias, dk_all, dv_all), _ = jax.lax.scan(step, init, jnp.arange(nkb))
    if bias is not None:  # through bias_h = q . Th[x] and bias_w = q . Tw[y]
      (dbh, dbw), (th_q, tw_q, x, y) = dbias, rel
      dbh = dbh[..., :th_q.shape[1]]
      dq = (dq + jnp.einsum('bhqk,qkc->bqhc', dbh, th_q.astype(_F32))
            + jnp.einsum('bhqk,qkc->bqhc', dbw, tw_q.astype(_F32)))
      qf = qb.astype(_F32)
      dtables = (dtables[0].at[x].add(jnp.einsum('bhqk,bqhc->qkc', dbh, qf)),
                 dtables[1].at[y].add(jnp.einsum('bhqk,bqhc->qkc', dbw, qf)))
    dq_all = jax.lax.dynamic_update_slice_in_dim(dq_all, dq, c * qc, axis=1)
    return (dq_all, dk_all, dv_all, dtables), None

  zeros = lambda x: jnp.zeros(x.shape, _F32)
  init = (jnp.zeros(qp.shape, _F32), zeros(kp), zeros(vp),
          None if tables is None else tuple(zeros(t) for t in tables))
  (dq, dk, dv, dtables), _ = jax.lax.scan(chunk, init, jnp.arange(nqc))
  cast = lambda d, like: d[:, :like.shape[1]].astype(like.dtype)
  if tables is not None:
    dtables = tuple(d.astype(t.dtype) for d, t in zip(dtables, tables))
  return cast(dq, q), cast(dk, k), cast(dv, v), dtables


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      rel_pos: tuple[jax.Array, jax.Array, tuple[int, int]] | None = None,
                      chunks: tuple[int, int] = (256, 512)) -> jax.Array:
  """Memory-efficient attention over [B, N, H, Dh] heads -> [B, Nq, H * Dh], equal to
  `_attend` (with `rel_pos_bias(q, *rel_pos)` for SAM's relative positions (rel_h, rel_w,
  grid)) up to float32 rounding. `chunks`: (queries per chunk, keys per block); with `rel_pos`
  a key block is whole key rows (at least one). Memory beyond q, k, v and float32 gradient
  accumulators: O(B H chunk block), forward and backward."""
  tables = None
  if rel_pos is not None:
    rel_h, rel_w, (h, w) = rel_pos
    if h * w != q.shape[1] or h * w != k.shape[1]:
      raise ValueError(f'relative positions over a {h}x{w} grid need {h * w} queries and keys, '
                       f'got {q.shape[1]} and {k.shape[1]}')
    tables = (_rel_pos_table(rel_h, h), _rel_pos_table(rel_w, w))
  out = _blocked(q, k, v, tables, tuple(chunks))
  return out.reshape(*out.shape[:2], -1)


def _cudnn_eligible(q: jax.Array) -> bool:
  return jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16)


def _fused_attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
  """`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU where it supports the call
  (float16 / bfloat16), else XLA's implementation (which materialises the logits)."""
  if _cudnn_eligible(q):
    try:
      out = jax.nn.dot_product_attention(q, k, v, bias, implementation='cudnn')
      return out.reshape(*out.shape[:2], -1)
    except (NotImplementedError, RuntimeError, ValueError):  # cuDNN absent / unsupported shape
      pass
  out = jax.nn.dot_product_attention(q, k, v, bias, implementation='xla')
  return out.reshape(*out.shape[:2], -1)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              rel_pos: tuple[jax.Array, jax.Array, tuple[int, int]] | None = None, *,
              impl: str = 'auto', chunks: tuple[int, int] = (256, 512),
              auto_tokens: int = 1024) -> jax.Array:
  """Self-attention over [B, N, H, Dh] heads -> [B, Nq, H * Dh] by implementation `impl`
  (`ATTENTION`); `rel_pos`: (rel_h, rel_w, grid) of SAM's decomposed relative positions.

  'plain' materialises [B, H, Nq, Nk] logits (the fast path for short sequences);
  'blocked' never does (`blocked_attention`, `chunks`); 'fused' is `jax.nn.dot_product_attention`
  (cuDNN on GPU in half precision, else XLA's); 'auto': 'fused' without a bias where cuDNN can
  run it, else 'blocked' above `auto_tokens` keys, else 'plain'.
  """
  if impl == 'auto':
    if rel_pos is None and _cudnn_eligible(q):
      impl = 'fused'
    else:
      impl = 'blocked' if k.shape[1] > auto_tokens else 'plain'
  if impl == 'blocked':
    return blocked_attention(q, k, v, rel_pos, chunks)
  bias = None if rel_pos is None else rel_pos_bias(q, *rel_pos)
  if impl == 'fused':
    return _fused_attend(q, k, v, bias)
  if impl == 'plain':
    return _attend(q, k, v, bias)
  raise ValueError(f'attention {impl!r}; allowed: {", ".join(ATTENTION)}')


def window_partition(x: jax.Array, size: int) -> jax.Array:
  """[B, h, w, D] -> [B * nh * nw, size * size, D], zero-padding h and w up to multiples of size."""
  b, h, w, d = x.shape
  x = jnp.pad(x, ((0, 0), (0, -h % size), (0, -w % size), (0, 0)))
  nh, nw = x.shape[1] // size, x.shape[2] // size
  x = x.reshape(b, nh, size, nw, size, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * nh * nw, size * size, d)


def window_unpartition(x: jax.Array, size: int, shape: tuple[int, int, int]) -> jax.Array:
  """Inverse of `window_partition` for an original [B, h, w] -> [B, h, w, D]."""
  b, h, w = shape
  nh, nw = -(-h // size), -(-w // size)
  x = x.reshape(b, nh, nw, size, size, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, nh * size, nw * size, -1)[:, :h, :w]


class Attention(nnx.Module):
  """Multi-head self-attention with separate q, k, v projections; optional windows + rel-pos."""

  def __init__(self, cfg: ViTConfig, *, window: int = 0, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.width
    self.query = layers.Dense(d, d, axes=('embed', 'heads'), use_bias=cfg.qkv_bias, **kw)
    self.key = layers.Dense(d, d, axes=('embed', 'heads'), use_bias=cfg.qkv_bias and cfg.key_bias,
                            **kw)
    self.value = layers.Dense(d, d, axes=('embed', 'heads'), use_bias=cfg.qkv_bias, **kw)
    self.out = layers.Dense(d, d, axes=('heads', 'embed'), **kw)
    self.num_heads, self.window, self.dtype = cfg.num_heads, window, dtype
    self.impl, self.chunks = cfg.attention, tuple(cfg.attention_chunks)
    self.auto_tokens = cfg.attention_auto_tokens
    self.rope_theta, self.head_dim = cfg.rope_theta, cfg.head_dim
    if cfg.rel_pos:
      gh, gw = (window, window) if window else cfg.pos_grid
      table = lambda n: layers.param(rngs, layers.zeros, (2 * n - 1, cfg.head_dim), (None, None),
                                     param_dtype)
      self.rel_pos_h, self.rel_pos_w = table(gh), table(gw)
    else:
      self.rel_pos_h = self.rel_pos_w = None

  def __call__(self, x: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
    """x [B, N, D]; `grid` (h, w) of the tokens, needed by windows and relative positions."""
    if not self.window:
      return self.attend(x, grid)
    b, _, d = x.shape
    windows = window_partition(x.reshape(b, *grid, d), self.window)
    out = self.attend(windows, (self.window, self.window))
    return window_unpartition(out, self.window, (b, *grid)).reshape(x.shape)

  def attend(self, x: jax.Array, grid: tuple[int, int] | None) -> jax.Array:
    q, k, v = (_split_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
    if self.rope_theta is not None:
      sin, cos = rope_tables(tuple(grid), self.head_dim, self.rope_theta)
      q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    rel_pos = None
    if self.rel_pos_h is not None:
      cast = lambda p: p[...].astype(self.dtype)
      rel_pos = (cast(self.rel_pos_h), cast(self.rel_pos_w), grid)
    return self.out(attention(q, k, v, rel_pos, impl=self.impl, chunks=self.chunks,
                              auto_tokens=self.auto_tokens))


class LayerScale(nnx.Module):

  def __init__(self, width: int, init: float, *, param_dtype, rngs: nnx.Rngs):
    self.gamma = layers.param(rngs, nnx.initializers.constant(init), (width,), ('norm',),
                              param_dtype)

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block. `adapter` (set by `kivfm.models.adapters`) runs in parallel:
  out = block(x) + adapter(x). `window` > 0: windowed attention (SAM)."""

  def __init__(self, cfg: ViTConfig, *, window: int = 0, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = layers.LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
    self.attn = Attention(cfg, window=window, **kw)
    self.norm2 = layers.LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
    self.mlp = layers.Mlp(cfg.width, cfg.mlp_dim, act=cfg.act, **kw)
    if cfg.layerscale is not None:
      self.ls1 = LayerScale(cfg.width, cfg.layerscale, param_dtype=param_dtype, rngs=rngs)
      self.ls2 = LayerScale(cfg.width, cfg.layerscale, param_dtype=param_dtype, rngs=rngs)
    else:
      self.ls1 = self.ls2 = None
    self.adapter = None

  def __call__(self, x: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
    scale = lambda ls, h: h if ls is None else ls(h)
    h = x + scale(self.ls1, self.attn(self.norm1(x), grid))
    h = h + scale(self.ls2, self.mlp(self.norm2(h)))
    if self.adapter is not None:
      h = h + self.adapter(x)
    return h


# -------------------------------------------------------------------------------------- heads


class MapHead(nnx.Module):
  """SigLIP multihead attention pooling: a learned probe attends to the tokens, then LN + MLP."""

  def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.width
    self.probe = layers.param(rngs, layers.trunc_normal, (1, 1, d), (None, None, 'embed'),
                              param_dtype)
    self.query = layers.Dense(d, d, axes=('embed', 'heads'), **kw)
    self.key = layers.Dense(d, d, axes=('embed', 'heads'), **kw)
    self.value = layers.Dense(d, d, axes=('embed', 'heads'), **kw)
    self.out = layers.Dense(d, d, axes=('heads', 'embed'), **kw)
    self.norm = layers.LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.mlp = layers.Mlp(d, cfg.mlp_dim, act=cfg.act, **kw)
    self.num_heads, self.dtype = cfg.num_heads, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, N, D] tokens -> [B, D]."""
    probe = jnp.broadcast_to(self.probe[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
    heads = lambda f, t: _split_heads(f(t), self.num_heads)
    h = self.out(_attend(heads(self.query, probe), heads(self.key, x), heads(self.value, x)))
    return (h + self.mlp(self.norm(h)))[:, 0]


class Neck(nnx.Module):
  """SAM neck: conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d, no biases, NHWC."""

  def __init__(self, width: int, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = layers.Conv(width, channels, 1, use_bias=False, axes=('embed', 'conv_out'), **kw)
    self.norm1 = layers.LayerNorm(channels, eps=1e-6, **kw)
    self.conv2 = layers.Conv(channels, channels, 3, padding=((1, 1), (1, 1)), use_bias=False, **kw)
    self.norm2 = layers.LayerNorm(channels, eps=1e-6, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm2(self.conv2(self.norm1(self.conv1(x))))


# ---------------------------------------------------------------------------------------- ViT


class ViT(nnx.Module):
  """Vision Transformer over normalised NHWC images of any size divisible by the patch."""

  def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: bool = False, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.cfg, self.dtype, self.remat = cfg, dtype, remat
    p, d = cfg.patch_size, cfg.width
    optional = lambda flag, make: make() if flag else None
    norm = lambda: layers.LayerNorm(d, eps=cfg.norm_eps, **kw)
    self.patch_embed = layers.Conv(3, d, p, stride=p, padding='VALID', use_bias=cfg.patch_bias,
                                   axes=(None, 'embed'), **kw)
    self.cls_token = optional(cfg.class_token, lambda: layers.param(
        rngs, layers.trunc_normal, (1, 1, d), (None, None, 'embed'), param_dtype))
    self.registers = optional(cfg.num_registers, lambda: layers.param(
        rngs, layers.trunc_normal, (1, cfg.num_registers, d), (None, 'tokens', 'embed'),
        param_dtype))
    gh, gw = cfg.pos_grid
    self.pos_embed = optional(cfg.rope_theta is None, lambda: layers.param(
        rngs, layers.trunc_normal, (1, cfg.num_pos_extra + gh * gw, d), (None, 'tokens', 'embed'),
        param_dtype))
    self.pre_norm = optional(cfg.pre_norm, norm)
    windows = [0 if i in cfg.global_layers else cfg.window_size for i in range(cfg.depth)]
    self.blocks = nnx.List([Block(cfg, window=w, **kw) for w in windows])
    self.norm = optional(cfg.final_norm, norm)
    self.cls_norm = optional(cfg.cls_norm, norm)
    self.map_head = optional(cfg.map_head, lambda: MapHead(cfg, **kw))
    self.proj = optional(cfg.proj_dim, lambda: layers.Dense(
        d, cfg.proj_dim, axes=('embed', None), use_bias=False, **kw))
    self.neck = optional(cfg.neck_dim, lambda: Neck(d, cfg.neck_dim, **kw))

  def embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """Patch + position embeddings, class and register tokens -> ([B, N, D], grid)."""
    cfg = self.cfg
    x = self.patch_embed(images)
    b, h, w, d = x.shape
    if self.pos_embed is not None:  # else rotary positions, in the attention
      pos = self.pos_embed[...].astype(self.dtype)
      grid = pos[0, cfg.num_pos_extra:].reshape(*cfg.pos_grid, d)
      x = x + resize_pos_embed(grid, (h, w), cfg.pos_interp, cfg.pos_interp_offset)[None]
    x = x.reshape(b, h * w, d)
    if cfg.class_token:
      cls = self.cls_token[...].astype(self.dtype)
      if cfg.num_pos_extra and self.pos_embed is not None:
        cls = cls + pos[:, :1]
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    if self.registers is not None:
      reg = jnp.broadcast_to(self.registers[...].astype(self.dtype), (b, cfg.num_registers, d))
      n_cls = int(cfg.class_token)
      x = jnp.concatenate([x[:, :n_cls], reg, x[:, n_cls:]], axis=1)
    return x, (h, w)

  def __call__(self, images: jax.Array, return_layers: tuple[int, ...] = ()) -> dict:
    x, grid = self.tokens(images)
    x, hidden = self.run_blocks(x, grid, 0, return_layers)
    return self.outputs(x, grid, hidden)

  def tokens(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """The input of the first block: ([B, N, D] tokens, (h, w) patch grid)."""
    x, grid = self.embed(images)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    return x, grid

  def run_blocks(self, x: jax.Array, grid: tuple[int, int], start: int = 0,
                 return_layers: tuple[int, ...] = (), stop: int | None = None):
    """Blocks start..stop-1 on tokens `x` -> (tokens, hidden states listed in `return_layers`)."""
    hidden = []
    for i in range(start, len(self.blocks) if stop is None else stop):
      block = self.blocks[i]
      x = layers.gradient_barrier(x)
      if self.remat:
        x = nnx.remat(lambda blk, t: blk(t, grid))(block, x)
      else:
        x = block(x, grid)
      if i in return_layers:
        hidden.append(x)
    return x, tuple(hidden)

  def outputs(self, x: jax.Array, grid: tuple[int, int], hidden: tuple = ()) -> dict:
    """The output contract (module docstring) from the last block's tokens."""
    cfg = self.cfg
    if self.norm is not None:
      x = self.norm(x)
    patches = x[:, int(cfg.class_token) + cfg.num_registers:]
    if self.map_head is not None:
      cls = self.map_head(x)
    else:
      cls = x[:, 0] if cfg.class_token else patches.mean(axis=1)
    if self.cls_norm is not None:
      cls = self.cls_norm(cls)
    out = {'cls': cls, 'patches': patches.reshape(x.shape[0], *grid, -1), 'hidden': hidden}
    if self.proj is not None:
      out['embedding'] = self.proj(cls)
    elif self.map_head is not None:
      out['embedding'] = cls
    if self.neck is not None:
      out['neck'] = self.neck(out['patches'])
    return out
