"""Baseline: teacher-space distillation only (AM-RADIO / Theia style), raw teacher features.

  python -m kivfm.main --config=configs/ablations/teacher_space.py --workdir=DIR
  (append :smoke to the config path for a tiny check run).
Expected: per-teacher losses scaled by each teacher's feature magnitude (see fidelity/*).
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base


def get_config(arg: str = ''):
  config = base(arg)
  config.unifier.update(shared_dim=0, normalizer='none')
  return config
