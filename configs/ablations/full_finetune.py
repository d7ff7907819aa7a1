"""Baseline: full fine-tuning of the student (no frozen base, no adapter: no preservation).

  python -m kivfm.main --config=configs/ablations/full_finetune.py --workdir=DIR  (:smoke for a check)
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base


def get_config(arg: str = ''):
  config = base(arg)
  config.student.adapter = 'none'
  config.optim.groups = (('student/.*', 0.1), ('unifier/.*', 1.0))
  return config
