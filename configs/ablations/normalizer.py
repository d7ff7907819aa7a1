"""Ablation: the teacher-feature normaliser in the shared latent space, named by the argument:
none, ema_zscore (UNIC), zscore (Theia; fixed statistics), phi_s (RADIOv2.5; fixed statistics).

  python -m kivfm.main --config=configs/ablations/normalizer.py:norm=ema_zscore --workdir=DIR
  python -m kivfm.main --config=configs/ablations/normalizer.py:norm=phi_s,smoke --workdir=DIR
zscore and phi_s read the teachers' feature statistics over the training data, computed first:
  python -m kivfm.compute_stats --config=configs/ablations/normalizer.py:norm=phi_s --workdir=DIR
Expected: the full runs are not run here (see configs/base.py); the smoke runs train (tests/
test_kpu.py covers phi_s from the computed statistics).
"""
from configs import base
from kivfm import config as config_lib


def get_config(arg: str):
  args = config_lib.parse_arg(arg, 'configs/ablations/normalizer.py',
                              norm=config_lib.NORMALIZERS, smoke=bool)
  config = base.get_config('smoke' if args['smoke'] else '')
  config.unifier.normalizer = args['norm']
  return config
