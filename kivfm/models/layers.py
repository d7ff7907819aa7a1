"""Building blocks shared by every model. Every weight carries logical axis names.

Conventions (all kivfm modules follow them):
  * images and feature maps are NHWC; tokens are [B, N, D];
  * constructors take keyword-only `dtype` (compute) and `param_dtype` (storage, float32) and
    `rngs: nnx.Rngs`; a model file never reads files or the network;
  * every `nnx.Param` is created with `param(...)`, which attaches logical axes as the variable
    metadata `logical_axes`; only `kivfm.sharding` maps them to mesh axes, through
    `config.sharding.rules`. (Not flax's `out_sharding`: flax resolves that against whatever mesh
    is active, e.g. in `nnx.eval_shape`, where a logical name is not a mesh axis.) Names used:
      'embed'  model width             'mlp'    MLP hidden width
      'heads'  attention heads x dim   'conv_in' / 'conv_out'  conv channels
      'norm'   norm scales and biases  'tokens' position / class tokens (token axis)
      'classes' classifier outputs     None     never sharded (kernel spatial dims ...).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm import backend

Initializer = Callable[..., jax.Array]
Axes = tuple[str | None, ...]

zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()
lecun_normal = nnx.initializers.lecun_normal()
trunc_normal = nnx.initializers.truncated_normal(0.02)


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes,
          param_dtype=jnp.float32) -> nnx.Param:
  """A parameter of `shape` with logical `axes` (one name, or None, per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f'logical axes {axes} do not match shape {tuple(shape)}')
  return nnx.Param(init(rngs.params(), tuple(shape), param_dtype), logical_axes=tuple(axes))


def logical_axes(variable: nnx.Variable) -> Axes | None:
  """The logical axes `param` (or `normalizers.norm_stats`) attached to `variable`."""
  return variable.get_metadata().get('logical_axes')


def float32_results(*operands: jax.Array) -> bool:
  """Whether a product of half-precision `operands` should ask for float32 results: on XLA:CPU,
  bf16 x bf16 -> f32 dots and convolutions run on AMX / AVX512-BF16 where the CPU has them (1.2-1.5
  TFLOP/s on 2 Sapphire Rapids cores), bf16 -> bf16 ones on a generic path (~270 GFLOP/s, below
  float32's ~300). Other backends accumulate in float32 anyway."""
  dtype = jnp.result_type(*operands)
  return backend.cpu_paths() and dtype in (jnp.bfloat16, jnp.float16)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.dot(a, b), with float32 results rounded back where `float32_results` says so."""
  if float32_results(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.result_type(a, b))
  return jnp.dot(a, b)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N]. Its kernel gradient is written as (g^T x)^T over flattened rows:
  for a layer that writes into a ViT's residual stream (an adapter's up projection), XLA:CPU
  otherwise fuses the whole backward residual chain into a transposed copy of g at every
  block, which costs time quadratic in depth (2x the whole step of a 12-block student)."""
  return dot(x, w)


def _matmul_fwd(x, w):
  return dot(x, w), (x, w)


def _matmul_bwd(residuals, g):
  x, w = residuals
  rows = lambda a: a.reshape(-1, a.shape[-1])
  return dot(g, w.T).astype(x.dtype), dot(rows(g).T, rows(x)).T.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
  """Identity. On XLA:CPU its cotangent is materialised here: without it XLA:CPU fuses the
  elementwise residual-gradient chain of every later ViT block into each block's backward
  fusions (time quadratic in depth, 10% of a 12-block student's step). A conditional is a
  fusion boundary XLA keeps (it drops `lax.optimization_barrier` on CPU); other backends fuse
  sensibly, and a conditional would cost a GPU a host round trip, so they get the identity."""
  return x


def _gradient_barrier_fwd(x):
  return x, None


def _gradient_barrier_bwd(_, g):
  if not backend.cpu_paths():
    return (g,)
  first = g.reshape(-1)[0]   # a predicate XLA cannot fold; false only if `first` is NaN
  return (jax.lax.cond(first == first, lambda t: t, lambda t: t * jnp.nan, g),)


gradient_barrier.defvjp(_gradient_barrier_fwd, _gradient_barrier_bwd)


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis; kernel axes (in, out), bias axes (out,)."""

  def __init__(self, in_features: int, out_features: int, *, axes: Axes = ('embed', 'mlp'),
               use_bias: bool = True, kernel_init: Initializer = lecun_normal,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
    self.bias = param(rngs, zeros, (out_features,), axes[1:], param_dtype) if use_bias else None
    self.dtype = dtype
    self.lora_a = self.lora_b = None  # set by `add_lora`
    self.lora_scale = 0.0

  def add_lora(self, rank: int, alpha: float, *, rngs: nnx.Rngs) -> None:
    """Adds a low-rank update x @ lora_a @ lora_b * alpha / rank; lora_b starts at zero."""
    d_in, d_out = self.kernel.shape
    in_axis, out_axis = logical_axes(self.kernel)
    dtype = self.kernel.dtype
    self.lora_a = nnx.data(param(rngs, nnx.initializers.he_uniform(), (d_in, rank),
                                 (in_axis, None), dtype))
    self.lora_b = nnx.data(param(rngs, zeros, (rank, d_out), (None, out_axis), dtype))
    self.lora_scale = alpha / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = matmul(x, self.kernel[...].astype(self.dtype))
    if self.lora_a is not None:
      low_rank = matmul(x, self.lora_a[...].astype(self.dtype))
      y = y + self.lora_scale * matmul(low_rank, self.lora_b[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32; optional affine."""

  def __init__(self, features: int, *, eps: float = 1e-6, affine: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = param(rngs, ones, (features,), ('norm',), param_dtype) if affine else None
    self.bias = param(rngs, zeros, (features,), ('norm',), param_dtype) if affine else None
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


class Conv(nnx.Module):
  """2-D convolution, NHWC input, HWIO kernel with axes (None, None, in_axis, out_axis)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
               padding: str | Sequence[tuple[int, int]] = 'SAME', groups: int = 1,
               use_bias: bool = True, axes: tuple[str | None, str | None] = ('conv_in', 'conv_out'),
               kernel_init: Initializer = lecun_normal, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_features // groups, out_features)
    self.kernel = param(rngs, kernel_init, shape, (None, None, *axes), param_dtype)
    self.bias = param(rngs, zeros, (out_features,), axes[1:], param_dtype) if use_bias else None
    self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if self.groups > 1 and kernel.shape[2:] == (1, self.groups) and backend.cpu_paths():
      y = depthwise_conv(x, kernel, self.stride, self.padding)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride, self.stride), padding=self.padding,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=self.groups,
          preferred_element_type=jnp.float32 if float32_results(x) else None).astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int,
                   padding: str | Sequence[tuple[int, int]]) -> jax.Array:
  """Depthwise convolution (NHWC input, [kh, kw, 1, C] kernel) as a sum of kh * kw shifted,
  strided slices times a per-channel weight: the same result as `conv_general_dilated` with
  `feature_group_count=C`, but XLA:CPU runs it 5-30x faster (forward and backward), because it
  fuses into elementwise loops instead of its slow grouped-convolution kernel."""
  kh, kw = kernel.shape[:2]
  pads = (jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), (stride, stride), padding)
          if isinstance(padding, str) else padding)
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  taps = (x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
          * kernel[i, j, 0] for i in range(kh) for j in range(kw))
  return sum(taps)


class BatchNorm(nnx.Module):
  """Inference BatchNorm over the channel axis; running statistics are frozen parameters."""

  def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    make = lambda init: param(rngs, init, (features,), ('conv_out',), param_dtype)
    self.scale, self.bias = make(ones), make(zeros)
    self.mean, self.var = make(zeros), make(ones)
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    f32 = lambda p: p[...].astype(jnp.float32)
    inv = f32(self.scale) * jax.lax.rsqrt(f32(self.var) + self.eps)
    return (x.astype(jnp.float32) * inv + (f32(self.bias) - f32(self.mean) * inv)).astype(self.dtype)


def gelu(x):
  """Exact GELU as PyTorch writes it, x * (1 + erf(x / sqrt 2)) / 2: XLA:CPU computes erf as a
  short rational polynomial, where `jax.nn.gelu`'s erfc takes exp and branches (1.6x slower)."""
  return 0.5 * x * (1 + jax.lax.erf(x * math.sqrt(0.5)))


def gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': gelu, 'gelu_tanh': gelu_tanh, 'quick_gelu': quick_gelu,
               'relu': jax.nn.relu, 'relu6': jax.nn.relu6, 'silu': jax.nn.silu}


class Mlp(nnx.Module):
  """Transformer MLP: fc1 -> act -> fc2, or SwiGLU (w12 -> silu(a) * b -> w3)."""

  def __init__(self, width: int, hidden: int, *, act: str = 'gelu', out_features: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    out_features = out_features or width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.swiglu = act == 'swiglu'
    if not self.swiglu and act not in ACTIVATIONS:
      raise ValueError(f'unknown activation {act!r}; allowed: swiglu, {", ".join(ACTIVATIONS)}')
    self.act = act
    self.fc1 = Dense(width, 2 * hidden if self.swiglu else hidden, axes=('embed', 'mlp'), **kw)
    self.fc2 = Dense(hidden, out_features, axes=('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)
    if self.swiglu:
      a, b = jnp.split(h, 2, axis=-1)
      h = jax.nn.silu(a) * b
    else:
      h = ACTIVATIONS[self.act](h)
    return self.fc2(h)


def resize_images(images: jax.Array, size: Sequence[int], method: str = 'bilinear',
                  antialias: bool = False) -> jax.Array:
  """Resizes NHWC images or feature maps to `size` (no-op when already there)."""
  if tuple(images.shape[1:3]) == tuple(size):
    return images
  shape = (images.shape[0], *size, images.shape[3])
  return jax.image.resize(images, shape, method=method, antialias=antialias).astype(images.dtype)


def preprocess(images: jax.Array, size: Sequence[int], mean: Sequence[float],
               std: Sequence[float], dtype=jnp.float32) -> jax.Array:
  """uint8 [0, 255] NHWC -> resized to `size` (bilinear, antialiased) -> (x/255 - mean) / std."""
  x = resize_images(images.astype(jnp.float32), size, antialias=True) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)
