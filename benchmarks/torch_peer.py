"""A PyTorch peer of kivfm's train step: the same algorithm, written the ordinary PyTorch way.

Student: a frozen HF `Dinov2Model` with a parallel bottleneck adapter in every block
(block(x) + s * Up(GELU(Down(LN(x)))), Up zero-initialised, as `kivfm.models.adapters`);
teachers: a second frozen `Dinov2Model` (the knowledge base) and EfficientNet-Lite0
(`efficientnet_lite_pytorch`; global = pooled head features, patches = head feature map), each
fed the view resized and normalised as `kivfm.models.layers.preprocess` does; per-teacher MLP
heads from the student's cls / patches (patches resized to the teacher grid) as
`kivfm.models.unifier` with shared_dim=0; the loss of `kivfm.losses.objective` (distances,
teacher weights, preservation term); AdamW with kivfm's warm-up + cosine schedule, decay mask
(matrices only) and global-norm clipping; a non-finite loss or gradient skips the update.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet
from torch import nn
from transformers import Dinov2Config, Dinov2Model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything the peer's step depends on; `benchmarks.kivfm_side.recipe` fills it from a
  kivfm config so both sides read the same numbers."""
  dino: Dinov2Config                      # student backbone and knowledge-base teacher
  effnet: str = 'efficientnet-lite0'
  image_size: int = 112                   # the view; every model sees it at this size
  dino_size: int = 112                    # the DINOv2 teacher's input side
  effnet_size: int = 112                  # the EfficientNet teacher's input side
  dino_mean: tuple = IMAGENET_MEAN
  dino_std: tuple = IMAGENET_STD
  weights: tuple = (('dino', 1.0), ('effnet', 1.0))  # teacher loss weights w_t
  adapter_dim: int = 64
  adapter_scale: float = 1.0
  hidden: int = 1024                      # s2t MLP width
  layers: int = 2                         # s2t MLP depth
  cos_weight: float = 0.9
  global_weight: float = 1.0
  patch_weight: float = 1.0
  preservation_weight: float = 0.1
  lr: float = 1e-3
  warmup_steps: int = 100
  total_steps: int = 1000
  end_lr_fraction: float = 0.0
  weight_decay: float = 0.05
  b1: float = 0.9
  b2: float = 0.999
  clip_norm: float = 1.0


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
  """uint8 [B, H, W, 3] -> NCHW float32, resized (bilinear, antialiased) and normalised."""
  x = images.permute(0, 3, 1, 2).float()
  if x.shape[-2:] != (size, size):
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=True)
  x = x / 255.0
  return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def resize(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
  """NHWC feature maps -> `grid` (bilinear, no antialias), as `layers.resize_images`."""
  if tuple(maps.shape[1:3]) == tuple(grid):
    return maps
  x = F.interpolate(maps.permute(0, 3, 1, 2), size=grid, mode='bilinear', align_corners=False)
  return x.permute(0, 2, 3, 1)


def tokens_to_features(hidden: torch.Tensor, grid: tuple[int, int]) -> dict:
  """Normed DINOv2 tokens [B, 1 + h*w, D] -> {'cls': [B, D], 'patches': [B, h, w, D]}."""
  return {'cls': hidden[:, 0], 'patches': hidden[:, 1:].reshape(hidden.shape[0], *grid, -1)}


class Bottleneck(nn.Module):
  """s * Up(GELU(Down(LN(x)))), Up starting at zero."""

  def __init__(self, width: int, dim: int, scale: float, eps: float = 1e-6):
    super().__init__()
    self.norm = nn.LayerNorm(width, eps=eps)
    self.down = nn.Linear(width, dim)
    self.up = nn.Linear(dim, width)
    nn.init.zeros_(self.up.weight)
    nn.init.zeros_(self.up.bias)
    self.scale = scale

  def forward(self, x):
    return self.scale * self.up(F.gelu(self.down(self.norm(x))))


class Student(nn.Module):
  """A frozen `Dinov2Model` whose every layer gets a parallel adapter: layer(x) + adapter(x)."""

  def __init__(self, vit: Dinov2Model, recipe: Recipe):
    super().__init__()
    self.vit = vit.requires_grad_(False).eval()
    width = vit.config.hidden_size
    self.adapters = nn.ModuleList(Bottleneck(width, recipe.adapter_dim, recipe.adapter_scale)
                                  for _ in vit.encoder.layer)
    self.size, self.mean, self.std = recipe.image_size, recipe.dino_mean, recipe.dino_std

  def forward(self, images: torch.Tensor) -> dict:
    x = preprocess(images, self.size, self.mean, self.std)
    grid = (x.shape[2] // self.vit.config.patch_size, x.shape[3] // self.vit.config.patch_size)
    h = self.vit.embeddings(x)
    for layer, adapter in zip(self.vit.encoder.layer, self.adapters):
      h = layer(h) + adapter(h)
    return tokens_to_features(self.vit.layernorm(h), grid)


class DinoTeacher(nn.Module):

  def __init__(self, vit: Dinov2Model, size: int, mean, std):
    super().__init__()
    self.vit, self.size, self.mean, self.std = vit, size, mean, std

  def forward(self, images):
    x = preprocess(images, self.size, self.mean, self.std)
    patch = self.vit.config.patch_size
    hidden = self.vit(pixel_values=x).last_hidden_state
    return tokens_to_features(hidden, (x.shape[2] // patch, x.shape[3] // patch))


class EffnetTeacher(nn.Module):
  """EfficientNet-Lite: patches = head features (conv + BN + ReLU6), cls = their mean."""

  def __init__(self, model: EfficientNet, size: int):
    super().__init__()
    self.model, self.size = model, size

  def forward(self, images):
    maps = self.model.extract_features(preprocess(images, self.size, HALF, HALF))
    patches = maps.permute(0, 2, 3, 1)
    return {'cls': patches.mean(dim=(1, 2)), 'patches': patches}


class MlpHead(nn.Module):
  """(Linear -> LN -> GELU) x (depth - 1) -> Linear."""

  def __init__(self, d_in: int, d_out: int, hidden: int, depth: int):
    super().__init__()
    widths = [d_in] + [hidden] * (depth - 1) + [d_out]
    self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
    self.norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-6) for _ in range(depth - 1))

  def forward(self, x):
    for dense, norm in zip(self.dense[:-1], self.norms):
      x = F.gelu(norm(dense(x)))
    return self.dense[-1](x)


class S2T(nn.Module):
  """Student {cls, patches} -> one teacher's {cls, patches}; patches resized to its grid."""

  def __init__(self, d_student: int, d_teacher: int, grid: tuple[int, int], hidden: int,
               depth: int):
    super().__init__()
    self.global_head = MlpHead(d_student, d_teacher, hidden, depth)
    self.patch_head = MlpHead(d_student, d_teacher, hidden, depth)
    self.grid = tuple(grid)

  def forward(self, student: dict) -> dict:
    return {'cls': self.global_head(student['cls']),
            'patches': self.patch_head(resize(student['patches'], self.grid))}


# ----------------------------------------------------------------------------------- the loss

def cosine_distance(pred, target, eps: float = 1e-6):
  cos = (pred * target).sum(-1) / (pred.norm(dim=-1).clamp_min(eps) *
                                   target.norm(dim=-1).clamp_min(eps))
  return (1.0 - cos).mean()


def distance(name: str, pred, target, cos_weight: float):
  if name == 'cosine':
    return cosine_distance(pred, target)
  return (cos_weight * cosine_distance(pred, target) +
          (1.0 - cos_weight) * F.smooth_l1_loss(pred, target, beta=1.0))


def pair_distance(pred: dict, target: dict, r: Recipe):
  """Cosine on global vectors + cos_smooth_l1 on patch maps."""
  return (r.global_weight * distance('cosine', pred['cls'], target['cls'], r.cos_weight) +
          r.patch_weight * distance('cos_smooth_l1', pred['patches'], target['patches'],
                                    r.cos_weight))


# ----------------------------------------------------------------------------------- the model

class Peer(nn.Module):
  """Teachers (frozen), student (frozen ViT + adapters) and the per-teacher heads."""

  def __init__(self, recipe: Recipe, seed: int = 0):
    super().__init__()
    torch.manual_seed(seed)
    dino = Dinov2Model(recipe.dino).eval()
    student_vit = Dinov2Model(recipe.dino)
    student_vit.load_state_dict(dino.state_dict())      # the student inherits the teacher
    effnet = EfficientNet.from_name(recipe.effnet, image_size=recipe.effnet_size).eval()
    self.teachers = nn.ModuleDict({
        'dino': DinoTeacher(dino, recipe.dino_size, recipe.dino_mean, recipe.dino_std),
        'effnet': EffnetTeacher(effnet, recipe.effnet_size)}).requires_grad_(False)
    self.student = Student(student_vit, recipe)
    probe = torch.zeros(1, recipe.image_size, recipe.image_size, 3, dtype=torch.uint8)
    with torch.no_grad():
      shapes = {a: (t['cls'].shape[-1], tuple(t['patches'].shape[1:3]))
                for a, t in self.targets(probe).items()}
    width = recipe.dino.hidden_size
    self.heads = nn.ModuleDict({a: S2T(width, d, grid, recipe.hidden, recipe.layers)
                                for a, (d, grid) in shapes.items()})
    self.recipe = recipe
    self.eval()  # frozen parts run in inference mode; adapters and heads have no dropout or BN

  def targets(self, images: torch.Tensor) -> dict:
    with torch.no_grad():
      return {alias: teacher(images) for alias, teacher in self.teachers.items()}

  def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The objective and its per-teacher terms on a uint8 NHWC batch."""
    r = self.recipe
    targets = self.targets(images)
    student = self.student(images)
    terms = {a: pair_distance(self.heads[a](student), targets[a], r) for a in sorted(targets)}
    total = sum(w * terms[a] for a, w in r.weights)
    kb = targets['dino']
    own = {'cls': student['cls'], 'patches': resize(student['patches'], kb['patches'].shape[1:3])}
    preservation = pair_distance(own, kb, r)
    total = total + r.preservation_weight * preservation
    return total, {**{f'loss/{a}': v for a, v in terms.items()}, 'preservation': preservation}

  def trainable(self) -> list[nn.Parameter]:
    return [p for p in self.parameters() if p.requires_grad]


def learning_rate(r: Recipe, step: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, lr, warmup, total, lr * end_lr_fraction) at `step`,
  with kivfm's clamp of the warm-up to total_steps - 1."""
  warmup = min(r.warmup_steps, r.total_steps - 1)
  if step < warmup:
    return r.lr * step / warmup
  decay = max(r.total_steps, warmup + 1) - warmup
  t = min(step - warmup, decay) / decay
  alpha = r.end_lr_fraction
  return r.lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * t)) + alpha)


class Trainer:
  """The peer and its AdamW; `step(images)` is one training step, `compile=True` runs the loss
  (forward and backward) through `torch.compile`, `autocast=True` under CPU bf16 autocast."""

  def __init__(self, recipe: Recipe, seed: int = 0, compile: bool = False,
               autocast: bool = False):
    self.peer = Peer(recipe, seed)
    self.autocast = autocast
    params = self.peer.trainable()
    groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': recipe.weight_decay},
              {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
    self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(recipe.b1, recipe.b2), eps=1e-8)
    self.loss_fn = torch.compile(self.peer.loss) if compile else self.peer.loss
    self.updates = 0   # applied updates: the schedule's count (a skipped step keeps it, as optax)

  def step(self, images: torch.Tensor) -> dict:
    """One update (skipped when the loss or gradient norm is not finite) -> scalars."""
    r = self.peer.recipe
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.autocast):
      loss, terms = self.loss_fn(images)
    loss.backward()
    params = self.peer.trainable()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, r.clip_norm if r.clip_norm > 0 else
                                               float('inf'))
    lr = learning_rate(r, self.updates)
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
      for group in self.optimizer.param_groups:
        group['lr'] = lr
      self.optimizer.step()
      self.updates += 1
    return {'loss': loss.detach(), 'grad_norm': grad_norm, 'lr': lr,
            **{k: v.detach() for k, v in terms.items()}}
