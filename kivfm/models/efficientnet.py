"""EfficientNet-Lite0..4 (ReLU6, no squeeze-excite, fixed stem and head), inference only.

Mirrors the lukemelas-style PyTorch layout (PyPI `efficientnet-lite-pytorch`): TF-"SAME" padding
(pad // 2 before, the rest after; output size ceil(in / stride)), BatchNorm with frozen running
statistics (eps 1e-3). The real lite0 checkpoint expects (x / 255 - 0.5) / 0.5.

Output contract (a dict): 'cls' [B, 1280] globally average-pooled head features, 'patches'
[B, ceil(H/32), ceil(W/32), 1280] head features (conv + BN + ReLU6), 'logits' [B, num_classes].
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kivfm.models import layers

INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)

# Base (lite0) stages: (repeats, kernel, stride, expand ratio, in channels, out channels).
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

# variant -> (width multiplier, depth multiplier, resolution).
VARIANTS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260), 3: (1.2, 1.4, 280),
            4: (1.4, 1.8, 300)}


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig:
  """Compound-scaled EfficientNet-Lite; `resolution` is the native input size."""
  width_mult: float = 1.0
  depth_mult: float = 1.0
  resolution: int = 224
  num_classes: int = 1000
  stem_features: int = 32     # not scaled by width_mult in Lite models
  head_features: int = 1280   # not scaled by width_mult in Lite models
  bn_eps: float = 1e-3
  divisor: int = 8


def efficientnet_lite_config(variant: int, **overrides) -> EfficientNetLiteConfig:
  """The standard EfficientNet-Lite{variant} configuration (variant 0..4)."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown EfficientNet-Lite variant {variant!r}; allowed: 0..4')
  w, d, r = VARIANTS[variant]
  return EfficientNetLiteConfig(width_mult=w, depth_mult=d, resolution=r, **overrides)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block: channels in/out, depthwise kernel and stride, expansion ratio."""
  in_features: int
  out_features: int
  kernel: int
  stride: int
  expand: int


def round_filters(filters: int, cfg: EfficientNetLiteConfig) -> int:
  """Channels scaled by the width multiplier, rounded to the divisor (TF rule)."""
  scaled = filters * cfg.width_mult
  rounded = max(cfg.divisor, int(scaled + cfg.divisor / 2) // cfg.divisor * cfg.divisor)
  return int(rounded + cfg.divisor if rounded < 0.9 * scaled else rounded)


def block_specs(cfg: EfficientNetLiteConfig) -> tuple[BlockSpec, ...]:
  """All MBConv blocks in order; the first and last stages keep their depth (Lite rule)."""
  specs = []
  for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
    fixed = i in (0, len(STAGES) - 1)
    repeats = repeats if fixed else int(math.ceil(repeats * cfg.depth_mult))
    cin = cfg.stem_features if i == 0 else round_filters(cin, cfg)
    cout = round_filters(cout, cfg)
    for r in range(repeats):
      specs.append(BlockSpec(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
  return tuple(specs)


class ConvBN(nnx.Module):
  """Bias-free TF-"SAME" conv -> BatchNorm -> optional ReLU6."""

  def __init__(self, in_features: int, out_features: int, kernel: int, *, stride: int = 1,
               groups: int = 1, in_axis: str | None = 'conv_in', act: bool = True, eps: float,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = layers.Conv(in_features, out_features, kernel, stride=stride, padding='SAME',
                            groups=groups, use_bias=False, axes=(in_axis, 'conv_out'), **kw)
    self.bn = layers.BatchNorm(out_features, eps=eps, **kw)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.bn(self.conv(x))
    return jax.nn.relu6(y) if self.act else y


class MBConv(nnx.Module):
  """Inverted residual: [1x1 expand] -> depthwise kxk -> 1x1 project (linear), + identity."""

  def __init__(self, spec: BlockSpec, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = spec.in_features * spec.expand
    self.expand = ConvBN(spec.in_features, hidden, 1, **kw) if spec.expand != 1 else None
    self.depthwise = ConvBN(hidden, hidden, spec.kernel, stride=spec.stride, groups=hidden,
                            in_axis=None, **kw)
    self.project = ConvBN(hidden, spec.out_features, 1, act=False, **kw)
    self.residual = spec.stride == 1 and spec.in_features == spec.out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.expand(x) if self.expand is not None else x
    h = self.project(self.depthwise(h))
    return x + h if self.residual else h


class EfficientNetLite(nnx.Module):
  """EfficientNet-Lite over normalised NHWC images of any size."""

  def __init__(self, cfg: EfficientNetLiteConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(eps=cfg.bn_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    specs = block_specs(cfg)
    self.cfg, self.dtype = cfg, dtype
    self.stem = ConvBN(3, cfg.stem_features, 3, stride=2, in_axis=None, **kw)
    self.blocks = nnx.List([MBConv(s, **kw) for s in specs])
    self.head = ConvBN(specs[-1].out_features, cfg.head_features, 1, **kw)
    self.fc = layers.Dense(cfg.head_features, cfg.num_classes, axes=('embed', 'classes'),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """Head feature map [B, ceil(H/32), ceil(W/32), head_features]."""
    x = self.stem(images)
    for block in self.blocks:
      x = block(x)
    return self.head(x)

  def classify(self, pooled: jax.Array) -> jax.Array:
    """The native classifier on pooled head features [B, head_features] -> logits."""
    return self.fc(pooled)

  def __call__(self, images: jax.Array) -> dict:
    patches = self.features(images)
    pooled = patches.astype(jnp.float32).mean(axis=(1, 2)).astype(self.dtype)
    return {'cls': pooled, 'patches': patches, 'logits': self.classify(pooled)}
