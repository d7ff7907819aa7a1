"""Baseline: teacher-space distillation only (AM-RADIO / Theia style), raw teacher features.

  python -m kivfm.main --config=configs/ablations/teacher_space.py --workdir=DIR   # ':smoke' checks
Expected: the full run is not run here (see configs/base.py). Measured on tiny teachers (tests/
test_kpu.py): per-teacher losses scale with each teacher's feature magnitude; the 100x larger
teacher carries > 99 % of the loss and its patch fidelity ends 0.18 below the other's.
"""
from configs import base


def get_config(arg: str = ''):
  config = base.get_config(arg)
  config.unifier.update(shared_dim=0, normalizer='none')
  return config
