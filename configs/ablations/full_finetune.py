"""Baseline: full fine-tuning of the student (no frozen base, no adapter: no preservation).

  python -m kivfm.main --config=configs/ablations/full_finetune.py --workdir=DIR   # ':smoke' checks
Expected: not run here (no accelerator, no ImageNet; see configs/base.py).
"""
from configs import base


def get_config(arg: str = ''):
  config = base.get_config(arg)
  config.student.adapter = 'none'
  config.optim.groups = (('student/.*', 0.1), ('unifier/.*', 1.0))
  return config
