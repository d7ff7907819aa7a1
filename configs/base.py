"""kivfm base recipe: DINOv2 ViT-B/14 knowledge base + adapter, inheriting from CLIP ViT-L/14 and
SAM ViT-B in a shared latent space (the defaults of docs/method.md).

Full run (ImageNet-1k images, 224 px, 100 epochs at batch 1024; needs network for the teacher
weights; about 125k steps):
  tfds build imagenet2012 --data_dir=DATA --file_format=array_record --manual_dir=TARS  # once
  python -m kivfm.main --config=configs/base.py --workdir=gs://BUCKET/kpu_b14 \\
      --config.data.tfds_data_dir=DATA
Expected: not run here (no accelerator, no ImageNet, no network for CLIP / SAM weights), so its
results are not measured. Its cost, from `python -m kivfm.aot --config=configs/base.py
--topology=...` (XLA's plan on CPU): 528 GFLOP per image; 58 GiB per device on 8 x H100 (~6 h
at MFU 0.4), 30 GiB per chip on a v4-32 (~11 h), 16 GiB on a v5p-64 (~3 h).

Smoke run (tiny random teachers and student, synthetic images; used by tests and CI):
  python -m kivfm.main --config=configs/base.py:smoke --workdir=/tmp/kivfm_smoke
Expected (measured, 2 CPU cores): 20 steps in well under a minute, metrics.jsonl with a
decreasing loss, checkpoints at steps 10 and 20.
"""
from kivfm import config as config_lib


def full(config):
  config.total_steps = 125_000                       # ~100 epochs of ImageNet-1k at batch 1024
  config.dtype = 'bfloat16'
  config.log_every = 100
  config.checkpoint_every = 2_000
  config.data.update(source='tfds', tfds_name='imagenet2012', tfds_split='train',
                     image_size=224, batch_size=1024)
  config.teachers.dinov2 = config_lib.teacher('dinov2-vitb14', weight=1.0)
  config.teachers.clip = config_lib.teacher('clip-vitl14', weight=1.0)
  # Each teacher gets the 224 px view at <= 2x (config.data.max_teacher_upsample): SAM at
  # 448 px (28 x 28 tokens, 4 windows of 14) rather than its native 1024 px.
  config.teachers.sam = config_lib.teacher('sam-vitb', weight=1.0, image_size=448)
  config.student.update(knowledge_base='dinov2', adapter='bottleneck', adapter_dim=128,
                        remat=True)
  config.unifier.update(hidden=1024, layers=2, shared_dim=768, normalizer='ema_zscore')
  config.optim.update(lr=1e-3, warmup_steps=5_000, weight_decay=0.05)
  return config


def smoke(config):
  config.total_steps = 20
  config.log_every = 5
  config.checkpoint_every = 10
  config.data.update(source='synthetic', num_examples=64, image_size=32, batch_size=8)
  config.student.update(knowledge_base='dino', adapter_dim=8)
  config.unifier.update(hidden=32, shared_dim=16)
  config.optim.update(warmup_steps=2, lr=1e-3)
  config.teachers.dino = config_lib.teacher('tiny-dino', weights='random', dtype='float32')
  config.teachers.vitb = config_lib.teacher('tiny-vit-b', weights='random', dtype='float32')
  return config


def get_config(arg: str = ''):
  args = config_lib.parse_arg(arg, 'configs/base.py', smoke=bool)
  return (smoke if args['smoke'] else full)(config_lib.defaults())
