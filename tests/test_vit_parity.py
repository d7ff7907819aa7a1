"""Parity of `kivfm.models.vit.ViT` + `kivfm.teachers.vit_port` with randomly initialised
transformers models (no download): DINOv2 (HF hub and transformers-5 names, registers, the
original repo layout), DINOv3 (rotary positions, storage tokens; HF and original layouts), CLIP,
SigLIP, SigLIP2 NaFlex and SAM, each at two or more configs, at the native resolution and at
non-square other ones. float32, max-abs <= 1e-4 on every output."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

transformers = pytest.importorskip('transformers')

from kivfm.models.vit import ViT, ViTConfig, resize_matrix  # noqa: E402
from kivfm.teachers import vit_port  # noqa: E402
from kivfm.weights.errors import ShapeMismatchError  # noqa: E402

from helpers import perturb, ported, torch_images  # noqa: E402

TOL = 1e-4
BATCH = 2
FAST_COMPILE = {'xla_backend_optimization_level': 0}  # tiny models: compile time dominates


def _ours(cfg, pure):
  """Jitted forward of the ported ViT: NCHW torch images -> numpy outputs with every layer."""
  graphdef, state = nnx.split(ported(lambda: ViT(cfg, rngs=nnx.Rngs(0)), pure))
  every = tuple(range(cfg.depth))
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_layers=every),
                    compiler_options=FAST_COMPILE)
  return lambda images: jax.tree.map(np.asarray, forward(state, images.permute(0, 2, 3, 1).numpy()))


def _compare(ours: dict, ref: dict, label: str) -> None:
  """Every key of `ref` against `ours` ('hidden': lists of token sequences)."""
  errors = {}
  for key, want in ref.items():
    got = ours[key]
    if key != 'hidden':
      got, want = [got], [want]
    assert len(got) == len(want), (label, key, len(got), len(want))
    for g, w in zip(got, want):
      assert np.shape(g) == np.shape(w), (label, key, np.shape(g), np.shape(w))
    errors[key] = max(float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(got, want))
  print(f'{label}: ' + ', '.join(f'{k} {v:.1e}' for k, v in errors.items()))
  assert max(errors.values()) <= TOL, (label, errors)
  assert float(np.abs(np.asarray(ref['patches'])).mean()) > 0.05, 'degenerate reference'


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy()


def _tokens_ref(out, n_prefix: int, grid: tuple[int, int]) -> dict:
  """cls / patches / hidden of an HF output whose last_hidden_state carries the final norm."""
  last = _np(out.last_hidden_state)
  return {'cls': last[:, 0], 'patches': last[:, n_prefix:].reshape(BATCH, *grid, -1),
          'hidden': [_np(h) for h in out.hidden_states[1:]]}


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: _np(v) for k, v in model.state_dict().items()}


def _grid(size, patch) -> tuple[int, int]:
  return size[0] // patch, size[1] // patch


# --------------------------------------------------------------------------------------- DINOv2

DINOV2 = {
    'small-gelu': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                       patch_size=8, image_size=32),
    'swiglu-nobias': dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=3,
                          patch_size=4, image_size=24, use_swiglu_ffn=True, qkv_bias=False,
                          layerscale_value=0.3),
}
SIZES = {8: [(32, 32), (40, 56)], 4: [(24, 24), (20, 36)], 16: [(48, 48), (64, 80)]}


def _to_hub_names(state: dict, prefix: str) -> dict:
  """transformers-5 DINOv2 names -> the names of checkpoints on the hub (fused SwiGLU input)."""
  renames = {'attention.q_proj': 'attention.attention.query', 'attention.k_proj':
             'attention.attention.key', 'attention.v_proj': 'attention.attention.value',
             'attention.o_proj': 'attention.output.dense', 'mlp.down_proj': 'mlp.weights_out'}
  out = {}
  for key, value in state.items():
    if '.mlp.up_proj.' in key:
      continue
    if '.mlp.gate_proj.' in key:
      up = state[key.replace('gate_proj', 'up_proj')]
      key, value = key.replace('gate_proj', 'weights_in'), np.concatenate([value, up])
    for old, new in renames.items():
      key = key.replace(old, new)
    out[prefix + key] = value
  return out


def _to_original(state: dict, depth: int) -> dict:
  """transformers-5 DINOv2 state dict -> the facebookresearch/dinov2 layout (fused qkv, w12/w3)."""
  out = {'cls_token': state['embeddings.cls_token'], 'mask_token': state['embeddings.mask_token'],
         'pos_embed': state['embeddings.position_embeddings'],
         'norm.weight': state['layernorm.weight'], 'norm.bias': state['layernorm.bias']}
  if 'embeddings.register_tokens' in state:
    out['register_tokens'] = state['embeddings.register_tokens']
  for t in ('weight', 'bias'):
    out[f'patch_embed.proj.{t}'] = state[f'embeddings.patch_embeddings.projection.{t}']
  for i in range(depth):
    a, b = f'encoder.layer.{i}.', f'blocks.{i}.'
    get = lambda name: state[a + name]
    for t in ('weight', 'bias'):
      out[f'{b}norm1.{t}'], out[f'{b}norm2.{t}'] = get(f'norm1.{t}'), get(f'norm2.{t}')
      out[f'{b}attn.proj.{t}'] = get(f'attention.o_proj.{t}')
      if a + f'attention.q_proj.{t}' in state:
        out[f'{b}attn.qkv.{t}'] = np.concatenate([get(f'attention.{n}_proj.{t}') for n in 'qkv'])
      if a + f'mlp.fc1.{t}' in state:
        out[f'{b}mlp.fc1.{t}'], out[f'{b}mlp.fc2.{t}'] = get(f'mlp.fc1.{t}'), get(f'mlp.fc2.{t}')
      else:
        gate, up = get(f'mlp.gate_proj.{t}'), get(f'mlp.up_proj.{t}')
        out[f'{b}mlp.w12.{t}'] = np.concatenate([gate, up])
        out[f'{b}mlp.w3.{t}'] = get(f'mlp.down_proj.{t}')
    out[f'{b}ls1.gamma'] = get('layer_scale1.lambda1')
    out[f'{b}ls2.gamma'] = get('layer_scale2.lambda1')
  return out


def _dinov2_case(name: str, registers: int, seed: int):
  kw = DINOV2[name]
  if registers:
    hf = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
  else:
    hf = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
  return perturb(hf, seed), vit_port.config_from_hf(hf.config)


def _dinov2_check(hf, cfg, pure, label: str) -> None:
  ours = _ours(cfg, pure)
  for i, size in enumerate(SIZES[cfg.patch_size]):
    x = torch_images(BATCH, size, i)
    with torch.no_grad():
      ref = _tokens_ref(hf(pixel_values=x, output_hidden_states=True), 1 + cfg.num_registers,
                        _grid(size, cfg.patch_size))
    _compare(ours(x), ref, f'{label} {size}')


@pytest.mark.parametrize('registers', [0, 4])
@pytest.mark.parametrize('name', list(DINOV2))
def test_dinov2_hf(name, registers):
  hf, cfg = _dinov2_case(name, registers, seed=1)
  assert cfg.act == ('swiglu' if 'swiglu' in name else 'gelu')
  state = _state(hf)
  if name == 'swiglu-nobias':  # hub checkpoint names under a prefix, plus a classifier head
    state = _to_hub_names(state, 'dinov2.')
    state['classifier.weight'] = np.zeros((3, 2 * cfg.width), np.float32)
  _dinov2_check(hf, cfg, vit_port.from_dinov2_hf(state, cfg), f'dinov2 {name} reg{registers}')


@pytest.mark.parametrize('name,registers', [('small-gelu', 0), ('swiglu-nobias', 2)])
def test_dinov2_original_layout(name, registers):
  hf, cfg = _dinov2_case(name, registers, seed=2)
  state = _to_original(_state(hf), cfg.depth)
  pure = vit_port.from_dinov2_original(state, cfg)
  _dinov2_check(hf, cfg, pure, f'dinov2-orig {name} reg{registers}')


def test_port_reports_every_key_problem():
  hf, cfg = _dinov2_case('small-gelu', 0, seed=3)
  state = _state(hf)
  del state['encoder.layer.1.mlp.fc2.bias']
  state['encoder.layer.0.bogus'] = np.zeros(3, np.float32)
  state['layernorm.weight'] = np.zeros(7, np.float32)
  with pytest.raises(ShapeMismatchError) as err:
    vit_port.from_dinov2_hf(state, cfg)
  message = str(err.value)
  for key in ('encoder.layer.1.mlp.fc2.bias', 'encoder.layer.0.bogus', 'layernorm.weight'):
    assert key in message
  assert 'mask_token' not in message


# --------------------------------------------------------------------------------------- DINOv3

DINOV3 = {  # ViT-S-like (4 registers, no key bias); 7B-like (SwiGLU, no qkv biases, no registers)
    'gelu-reg4': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, patch_size=8, image_size=32, num_register_tokens=4,
                      layerscale_value=0.5),
    'swiglu-nobias': dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                          intermediate_size=40, patch_size=4, image_size=24, use_gated_mlp=True,
                          hidden_act='silu', query_bias=False, value_bias=False, rope_theta=50.0),
    'head32-reg1': dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, patch_size=16, image_size=48, num_register_tokens=1,
                        key_bias=True),
}


def _dinov3_case(name: str, seed: int):
  hf = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**DINOV3[name]))
  return perturb(hf, seed), vit_port.config_from_hf(hf.config)


def _to_dinov3_original(state: dict, cfg: ViTConfig) -> dict:
  """transformers-5 DINOv3 state dict -> the facebookresearch/dinov3 layout (fused qkv with a
  key-bias mask, storage tokens, SwiGLU w1 / w2 / w3, stored RoPE periods)."""
  d = cfg.width
  periods = cfg.rope_theta ** (np.arange(cfg.head_dim // 4) * 4 / cfg.head_dim)
  out = {'cls_token': state['embeddings.cls_token'],
         'mask_token': state['embeddings.mask_token'][0],
         'rope_embed.periods': periods.astype(np.float32),
         'norm.weight': state['norm.weight'], 'norm.bias': state['norm.bias'],
         'patch_embed.proj.weight': state['embeddings.patch_embeddings.weight'],
         'patch_embed.proj.bias': state['embeddings.patch_embeddings.bias']}
  if cfg.num_registers:
    out['storage_tokens'] = state['embeddings.register_tokens']
  mlp = {'gate_proj': 'w1', 'up_proj': 'w2', 'down_proj': 'w3'} if cfg.act == 'swiglu' else {
      'up_proj': 'fc1', 'down_proj': 'fc2'}
  for i in range(cfg.depth):
    a, b = f'model.layer.{i}.', f'blocks.{i}.'
    get = lambda name: state[a + name]
    for t in ('weight', 'bias'):
      out[f'{b}norm1.{t}'], out[f'{b}norm2.{t}'] = get(f'norm1.{t}'), get(f'norm2.{t}')
      out[f'{b}attn.proj.{t}'] = get(f'attention.o_proj.{t}')
      for theirs, ours in mlp.items():
        out[f'{b}mlp.{ours}.{t}'] = get(f'mlp.{theirs}.{t}')
    out[f'{b}attn.qkv.weight'] = np.concatenate([get(f'attention.{n}_proj.weight') for n in 'qkv'])
    if cfg.qkv_bias:  # a nonzero key bias that the mask must remove
      key = get('attention.k_proj.bias') if cfg.key_bias else np.full(d, 7.0, np.float32)
      out[f'{b}attn.qkv.bias'] = np.concatenate(
          [get('attention.q_proj.bias'), key, get('attention.v_proj.bias')])
      mask = np.ones(3 * d, np.float32)
      mask[d:2 * d] = float(cfg.key_bias)
      out[f'{b}attn.qkv.bias_mask'] = mask
    out[f'{b}ls1.gamma'] = get('layer_scale1.lambda1')
    out[f'{b}ls2.gamma'] = get('layer_scale2.lambda1')
  return out


def _dinov3_check(hf, cfg, pure, label: str) -> None:
  ours = _ours(cfg, pure)
  p = cfg.patch_size
  for i, size in enumerate([(3 * p, 3 * p), (2 * p, 5 * p), (6 * p, 4 * p)]):
    x = torch_images(BATCH, size, i)
    with torch.no_grad():
      out = hf(pixel_values=x, output_hidden_states=True)
    ref = _tokens_ref(out, 1 + cfg.num_registers, _grid(size, p))
    assert len(out.hidden_states) == cfg.depth + 1
    ref['cls'] = _np(out.pooler_output)
    _compare(ours(x), ref, f'{label} {size}')


@pytest.mark.parametrize('name', list(DINOV3))
def test_dinov3_hf(name):
  hf, cfg = _dinov3_case(name, seed=11)
  assert cfg.rope_theta and (cfg.act == 'swiglu') == ('swiglu' in name)
  state = _state(hf)
  if name == 'swiglu-nobias':  # Hub files: `layer.{i}` (no `model.`), under an outer prefix
    state = {'backbone.' + k.replace('model.layer.', 'layer.'): v for k, v in state.items()}
  _dinov3_check(hf, cfg, vit_port.from_dinov3_hf(state, cfg), f'dinov3 {name}')


@pytest.mark.parametrize('name', ['gelu-reg4', 'swiglu-nobias'])
def test_dinov3_original_layout(name):
  hf, cfg = _dinov3_case(name, seed=12)
  pure = vit_port.from_dinov3_original(_to_dinov3_original(_state(hf), cfg), cfg)
  _dinov3_check(hf, cfg, pure, f'dinov3-orig {name}')


def test_dinov3_original_layout_checks_rope_periods():
  hf, cfg = _dinov3_case('gelu-reg4', seed=13)
  state = _to_dinov3_original(_state(hf), cfg)
  state['rope_embed.periods'] = state['rope_embed.periods'] * 2
  with pytest.raises(ValueError, match='rope_embed.periods'):
    vit_port.from_dinov3_original(state, cfg)


# ----------------------------------------------------------------------------------------- CLIP

CLIP = {
    'quick-gelu': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, patch_size=8, image_size=32, projection_dim=16),
    'gelu-p16': dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=96, patch_size=16, image_size=48, projection_dim=24,
                     hidden_act='gelu'),
}


@pytest.mark.parametrize('name', list(CLIP))
def test_clip(name):
  hf = perturb(transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**CLIP[name])), seed=4)
  cfg = vit_port.config_from_hf(hf.config)
  ours = _ours(cfg, vit_port.from_clip_hf(_state(hf), cfg))
  for i, size in enumerate(SIZES[cfg.patch_size]):
    x = torch_images(BATCH, size, i)
    with torch.no_grad():
      tower = hf.vision_model(x, interpolate_pos_encoding=True, output_hidden_states=True)
      embeds = hf(x, interpolate_pos_encoding=True).image_embeds
    ref = _tokens_ref(tower, 1, _grid(size, cfg.patch_size))
    ref.update(cls=_np(tower.pooler_output), embedding=_np(embeds))
    _compare(ours(x), ref, f'clip {name} {size}')


# --------------------------------------------------------------------------------------- SigLIP

SIGLIP = {
    'map-head': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, patch_size=8, image_size=32),
    'no-head-p16': dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=96, patch_size=16, image_size=48,
                        vision_use_head=False),
}


def _siglip_ref(out, cfg, size) -> dict:
  grid = _grid(size, cfg.patch_size)
  last = _np(out.last_hidden_state)
  ref = {'patches': last.reshape(BATCH, *grid, -1),
         'hidden': [_np(h) for h in out.hidden_states[1:]]}
  if cfg.map_head:
    ref.update(cls=_np(out.pooler_output), embedding=_np(out.pooler_output))
  else:
    ref['cls'] = last.mean(axis=1)
  return ref


@pytest.mark.parametrize('name', list(SIGLIP))
def test_siglip(name):
  hf = perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP[name])),
                seed=5)
  cfg = vit_port.config_from_hf(hf.config)
  ours = _ours(cfg, vit_port.from_siglip_hf(_state(hf), cfg))
  for i, size in enumerate(SIZES[cfg.patch_size]):
    x = torch_images(BATCH, size, i)
    with torch.no_grad():
      out = hf(x, interpolate_pos_encoding=True, output_hidden_states=True)
    _compare(ours(x), _siglip_ref(out, cfg, size), f'siglip {name} {size}')


SIGLIP2 = {
    'map-head': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, patch_size=8, num_patches=16),
    'p4-36': dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                  intermediate_size=96, patch_size=4, num_patches=36),
}


def _patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
  """NCHW -> [B, N, ph * pw * C] in the order of the SigLIP2 image processor."""
  b, c, h, w = x.shape
  x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
  return x.reshape(b, (h // patch) * (w // patch), -1)


@pytest.mark.parametrize('name', list(SIGLIP2))
def test_siglip2_naflex(name):
  hf = perturb(transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**SIGLIP2[name])),
                seed=6)
  cfg = vit_port.config_from_hf(hf.config)
  assert cfg.pos_interp == 'bilinear_aa'
  ours = _ours(cfg, vit_port.from_siglip_hf(_state(hf), cfg))
  for i, size in enumerate(SIZES[cfg.patch_size]):
    x, grid = torch_images(BATCH, size, i), _grid(size, cfg.patch_size)
    with torch.no_grad():
      out = hf(pixel_values=_patchify(x, cfg.patch_size),
               pixel_attention_mask=torch.ones(BATCH, grid[0] * grid[1], dtype=torch.long),
               spatial_shapes=torch.tensor([grid] * BATCH), output_hidden_states=True)
    _compare(ours(x), _siglip_ref(out, cfg, size), f'siglip2 {name} {size}')


# ------------------------------------------------------------------------------------------ SAM

SAM = {
    'win3-pad': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                     image_size=64, patch_size=8, window_size=3, global_attn_indexes=[1],
                     output_channels=16),
    'win4-nobias': dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, mlp_dim=96,
                        image_size=48, patch_size=8, window_size=4, global_attn_indexes=[0],
                        output_channels=24, qkv_bias=False),
}


def _sam_layers(encoder, x: torch.Tensor):
  """HF SAM encoder run layer by layer with the absolute positions resized bicubically (as
  ViTDet's get_abs_pos does): HF's own forward refuses any size but the native one."""
  h = encoder.patch_embed.projection(x).permute(0, 2, 3, 1)
  pos = F.interpolate(encoder.pos_embed.permute(0, 3, 1, 2), size=h.shape[1:3], mode='bicubic',
                      align_corners=False)
  h = h + pos.permute(0, 2, 3, 1)
  hidden = []
  for layer in encoder.layers:
    h = layer(h)
    hidden.append(h)
  return hidden, encoder.neck(h)


def _sam_ref(hidden, neck) -> dict:
  last = _np(hidden[-1])
  return {'cls': last.mean(axis=(1, 2)), 'patches': last, 'neck': _np(neck).transpose(0, 2, 3, 1),
          'hidden': [_np(h).reshape(BATCH, -1, h.shape[-1]) for h in hidden]}


@pytest.mark.parametrize('name', list(SAM))
def test_sam(name):
  hf = perturb(transformers.SamVisionModel(transformers.SamVisionConfig(**SAM[name])), seed=7)
  cfg = vit_port.config_from_hf(hf.config)
  ours = _ours(cfg, vit_port.from_sam_hf(_state(hf), cfg))
  native = (cfg.pos_grid[0] * cfg.patch_size,) * 2
  other = (native[0] - 2 * cfg.patch_size, native[1] + 3 * cfg.patch_size)
  x = torch_images(BATCH, native, 0)
  with torch.no_grad():
    out = hf(x, output_hidden_states=True)
    hidden, neck = _sam_layers(hf.vision_encoder, x)
  assert torch.equal(neck, out.last_hidden_state) and torch.equal(hidden[-1], out.hidden_states[-1])
  _compare(ours(x), _sam_ref(out.hidden_states[1:], out.last_hidden_state),
           f'sam {name} {native}')
  x = torch_images(BATCH, other, 1)
  with torch.no_grad():
    hidden, neck = _sam_layers(hf.vision_encoder, x)
  _compare(ours(x), _sam_ref(hidden, neck), f'sam {name} {other}')


def test_class_token_without_position_row():
  """pos_embed_cls=False (timm `no_embed_class`): the table covers the patches only."""
  cfg = ViTConfig(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, pos_grid=(4, 4),
                  pos_embed_cls=False)
  model = ViT(cfg, rngs=nnx.Rngs(0))
  assert model.pos_embed.shape == (1, 16, 32)
  tokens, _ = model.embed(np.zeros((1, 32, 32, 3), np.float32))
  np.testing.assert_array_equal(tokens[0, 0], model.cls_token[0, 0])


def test_sam_full_model_ignores_prompt_and_mask_parts():
  hf = transformers.SamModel(transformers.SamConfig(vision_config=SAM['win3-pad']))
  cfg = vit_port.config_from_hf(hf.config)
  pure = vit_port.from_sam_hf(_state(hf), cfg)
  assert pure['neck']['conv2']['kernel'].shape == (3, 3, 16, 16)


# ------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize('method,kw', [
    ('bicubic', dict(mode='bicubic')),
    ('bicubic_aa', dict(mode='bicubic', antialias=True)),
    ('bilinear_aa', dict(mode='bilinear', antialias=True)),
])
def test_resize_matrix_matches_torch(method, kw):
  x = torch.randn(1, 1, 37, 11, generator=torch.Generator().manual_seed(8))
  for out in (5, 16, 37, 50):
    ref = F.interpolate(x, size=(out, 11), align_corners=False, **kw)[0, 0].numpy()
    np.testing.assert_allclose(resize_matrix(37, out, method) @ x[0, 0].numpy(), ref, atol=2e-5)


def test_resize_matrix_offset_matches_original_dinov2():
  """facebookresearch/dinov2: scale_factor=(n + 0.1) / M instead of an output size."""
  x = torch.randn(1, 1, 37, 11, generator=torch.Generator().manual_seed(9))
  for out in (4, 16, 23):
    ref = F.interpolate(x, scale_factor=((out + 0.1) / 37, 1.0), mode='bicubic')[0, 0].numpy()
    np.testing.assert_allclose(resize_matrix(37, out, 'bicubic', 0.1) @ x[0, 0].numpy(), ref,
                               atol=2e-5)
