"""Ablation: LoRA on every attention and MLP projection instead of the bottleneck adapter.

  python -m kivfm.main --config=configs/ablations/lora.py --workdir=DIR  (:smoke for a check)
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base


def get_config(arg: str = ''):
  config = base(arg)
  config.student.adapter = 'lora'
  return config
