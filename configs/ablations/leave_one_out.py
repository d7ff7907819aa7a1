"""Ablation: drop one teacher, named by the argument: `leave_one_out.py:drop=clip` (full recipe)
or `leave_one_out.py:drop=vitb,smoke` (tiny check). The knowledge-base teacher cannot be dropped.

  python -m kivfm.main --config=configs/ablations/leave_one_out.py:drop=clip --workdir=DIR
Expected: not run here (no accelerator, no ImageNet; see configs/base.py).
"""
from configs import base
from kivfm import config as config_lib


def get_config(arg: str):
  args = config_lib.parse_arg(arg, 'configs/ablations/leave_one_out.py', drop=str, smoke=bool)
  config = base.get_config('smoke' if args['smoke'] else '')
  drop = args['drop']
  if drop == config.student.knowledge_base or drop not in config.teachers:
    raise config_lib.ConfigError(
        f'leave_one_out: cannot drop {drop!r}; choose one of '
        f'{sorted(set(config.teachers) - {config.student.knowledge_base})}')
  with config.unlocked():
    del config.teachers[drop]
  return config
