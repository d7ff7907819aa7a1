"""Ablation: drop one teacher. The argument names it: `leave_one_out.py:clip` (full recipe) or
`leave_one_out.py:smoke,vitb` (tiny check). The knowledge-base teacher cannot be dropped.

  python -m kivfm.main --config=configs/ablations/leave_one_out.py:clip --workdir=DIR
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base


def get_config(arg: str):
  scale, _, drop = arg.rpartition(',')
  config = base(scale)
  if drop == config.student.knowledge_base or drop not in config.teachers:
    raise ValueError(f'leave_one_out: cannot drop {drop!r}; choose one of '
                     f'{sorted(set(config.teachers) - {config.student.knowledge_base})}')
  with config.unlocked():
    del config.teachers[drop]
  return config
