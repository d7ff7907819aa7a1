"""Saliency decoder of the img-focus teacher: patch features -> per-pixel importance in [0, 1].

3 x [ConvTranspose(4, stride 2, padding 1) + BatchNorm + ReLU] (each doubles h and w), a 1x1 conv
to one channel, bilinear resize to the image size (half-pixel centres), sigmoid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm.models import layers


class ConvTranspose(nnx.Module):
  """Transposed convolution as torch / ONNX define it. The kernel is torch's [in, out, kh, kw]
  weight laid out as (kh, kw, in, out), unflipped; output size (n - 1) * stride - 2 * pad + k."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int,
               padding: int, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    shape = (kernel_size, kernel_size, in_features, out_features)
    axes = (None, None, 'conv_in', 'conv_out')
    self.kernel = layers.param(rngs, layers.lecun_normal, shape, axes, param_dtype)
    self.bias = layers.param(rngs, layers.zeros, (out_features,), ('conv_out',), param_dtype)
    self.stride, self.padding, self.dtype = stride, padding, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)[::-1, ::-1]
    pad = kernel.shape[0] - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        lhs_dilation=(self.stride, self.stride), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.bias[...].astype(self.dtype)


class UpBlock(nnx.Module):
  """ConvTranspose(4, stride 2, padding 1) -> BatchNorm -> ReLU: doubles the resolution."""

  def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = ConvTranspose(in_features, out_features, 4, stride=2, padding=1, **kw)
    self.bn = layers.BatchNorm(out_features, eps=1e-5, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class SaliencyDecoder(nnx.Module):
  """Patch features [B, h, w, D] -> saliency probabilities [B, H, W, 1] at the image size."""

  def __init__(self, width: int = 384, channels: tuple[int, ...] = (256, 128, 64), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    widths = (width, *channels)
    self.ups = nnx.List([UpBlock(a, b, **kw) for a, b in zip(widths[:-1], widths[1:])])
    self.head = layers.Conv(channels[-1], 1, 1, axes=('conv_in', None), **kw)

  def __call__(self, patches: jax.Array, size: tuple[int, int]) -> jax.Array:
    x = patches
    for up in self.ups:
      x = up(x)
    logits = layers.resize_images(self.head(x).astype(jnp.float32), size, 'bilinear')
    return jax.nn.sigmoid(logits)
