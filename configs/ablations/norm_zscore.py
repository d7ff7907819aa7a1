"""Ablation: teacher-feature normaliser 'zscore' in the shared latent space.

  python -m kivfm.main --config=configs/ablations/norm_zscore.py --workdir=DIR   (:smoke for a check)
zscore and phi_s read statistics from config.unifier.stats_dir (computed over the training data).
"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import base


def get_config(arg: str = ''):
  config = base(arg)
  config.unifier.normalizer = 'zscore'
  return config
