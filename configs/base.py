"""kivfm base recipe.

Smoke run (tiny random teachers and student, synthetic images; well under a minute on 2 CPU
cores, used by tests and CI):
  python -m kivfm.main --config=configs/base.py:smoke --workdir=/tmp/kivfm_smoke
Expected: 20 steps, metrics.jsonl with a decreasing loss, a checkpoint at step 20.
"""
from kivfm import config as config_lib


def smoke(config):
  config.total_steps = 20
  config.log_every = 5
  config.checkpoint_every = 10
  config.data.update(source='synthetic', num_examples=64, image_size=32, batch_size=8)
  config.student.update(knowledge_base='dino', adapter_dim=8)
  config.unifier.update(hidden=32)
  config.optim.update(warmup_steps=2, lr=1e-3)
  config.teachers.dino = config_lib.teacher('tiny-dino', weights='random', dtype='float32')
  config.teachers.vitb = config_lib.teacher('tiny-vit-b', weights='random', dtype='float32')
  return config


def get_config(arg: str = ''):
  config = config_lib.defaults()
  if arg == 'smoke':
    return smoke(config)
  raise ValueError(f'configs/base.py: unknown argument {arg!r}; allowed: smoke')
