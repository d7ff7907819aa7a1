"""Ablation: LoRA on every attention and MLP projection instead of the bottleneck adapter.

  python -m kivfm.main --config=configs/ablations/lora.py --workdir=DIR   # ':smoke' checks
Expected: not run here (no accelerator, no ImageNet; see configs/base.py).
"""
from configs import base


def get_config(arg: str = ''):
  config = base.get_config(arg)
  config.student.adapter = 'lora'
  return config
