"""Evaluates a finished run, or a teacher on its own, with a pinned protocol.

  python -m kivfm.evaluate --config=configs/eval/fashion_mnist.py --workdir=runs/demo [--step=N]
  python -m kivfm.evaluate --config=configs/eval/fashion_mnist.py --workdir=runs/baselines \\
      --model=teacher:dinov2-vits14
A protocol is a config file whose `evals` name the evaluators (`kivfm.evals.EVALUATORS`) with
every setting pinned, and whose `data` says where datasets are and the image size. Writes
DIR/eval/<protocol>.json for the run's student (latest checkpoint, or --step) or
DIR/eval/<protocol>.teacher-<name>.json for a teacher, and prints a table. The same evaluators
run during training when the training config names them in its `evals`.
"""
from __future__ import annotations

import logging
import os
import sys

import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from kivfm import allocator, evals, inference, paths, teachers
from kivfm.errors import ConfigError, DataUnavailableError
from kivfm.weights.errors import WeightFileError


def load_model(model: str, workdir: str, step: int | None, image_size: int, weights: str):
  """'student': the run in `workdir`; 'teacher:<registry name>': that teacher at `image_size`."""
  if model == 'student':
    return inference.load(workdir, step)
  kind, _, name = model.partition(':')
  if kind != 'teacher' or not name:
    raise ConfigError(f'--model={model!r}: use student or teacher:<registry name>')
  if weights == 'random':
    teacher = teachers.build(name, image_size=image_size, dtype=jnp.float32)
  else:
    teacher = teachers.load(name, weights=weights, image_size=image_size, dtype=jnp.float32)
  return inference.TeacherModel(name, teacher)


def result_name(protocol: str, model: str) -> str:
  return protocol if model == 'student' else f'{protocol}.{model.replace(":", "-")}'


def run(protocol_config, protocol: str, workdir: str, model: str = 'student',
        step: int | None = None, weights: str = 'pretrained') -> dict:
  """Runs every evaluator of `protocol_config` on `model`; writes and returns
  {'protocol', 'model', 'step', 'results': {evaluator: results}}."""
  evals.validate(protocol_config.evals)
  if not protocol_config.evals:
    raise ConfigError(f'protocol {protocol!r} names no evaluator (config.evals is empty)')
  evaluators = evals.build(protocol_config)
  subject = load_model(model, workdir, step, protocol_config.data.image_size, weights)
  results = {}
  for name, evaluator in evaluators.items():
    evaluator.start(subject)
    results[name] = evaluator.evaluate(subject)
  record = {'protocol': protocol, 'model': model, 'step': getattr(subject, 'step', None),
            'results': results}
  evals.write(workdir, result_name(protocol, model), _Printer(evaluators), record)
  return record


class _Printer:
  """Each evaluator's own output (tables, figures) for the combined record."""

  def __init__(self, evaluators: dict):
    self.evaluators = evaluators

  def write(self, record: dict, workdir: str) -> None:
    print(f'{record["protocol"]} / {record["model"]}')
    for name, evaluator in self.evaluators.items():
      evaluator.write(record['results'][name], workdir)


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  f = flags.FLAGS
  protocol = os.path.splitext(os.path.basename(f['config'].config_filename))[0]
  try:
    run(f.config, protocol, f.workdir, f.model, f.step, f.teacher_weights)
  except ConfigError as e:
    sys.exit(f'config error: {e}')
  except DataUnavailableError as e:
    sys.exit(f'data unavailable: {e}')
  except WeightFileError as e:
    sys.exit(f'weights: {e}')
  print(f'written to {paths.path(f.workdir) / "eval" / (result_name(protocol, f.model) + ".json")}')


if __name__ == '__main__':
  allocator.restart_with_tcmalloc()
  config_flags.DEFINE_config_file('config', None, 'Protocol config (configs/eval/*.py).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (student) or output directory (teacher).')
  flags.DEFINE_string('model', 'student', 'student, or teacher:<registry name>.')
  flags.DEFINE_integer('step', None, 'Checkpoint step of the student (default: latest).')
  flags.DEFINE_string('teacher_weights', 'pretrained',
                      "With --model=teacher:NAME: 'pretrained', 'random' or a weight file.")
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
