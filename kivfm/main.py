"""Entry point: python -m kivfm.main --config=configs/base.py --workdir=DIR [--config.a.b=v]."""
from __future__ import annotations

import logging
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from kivfm import allocator, config as config_lib
from kivfm.errors import DataUnavailableError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (get_config(arg)); '
                                          'path[:arg], e.g. configs/base.py:smoke.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and logs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train'], 'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax and grain; their warnings and errors still show."""

  def filter(self, record):
    noisy = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain'))
    return record.levelno >= logging.WARNING or not noisy


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())
  from kivfm import train  # after flag parsing: jax reads XLA_FLAGS at import
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f'config error: {e}')
  except DataUnavailableError as e:
    sys.exit(f'data unavailable: {e}')
  except train.NonFiniteError as e:
    sys.exit(f'stopped: {e}')
  except train.Preempted as e:
    logging.warning('%s', e)
    sys.exit(128 + signal.SIGTERM)


if __name__ == '__main__':
  allocator.restart_with_tcmalloc()
  app.run(main)
