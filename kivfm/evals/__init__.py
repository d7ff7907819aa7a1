"""Evaluators: plug-ins that measure a student, named in `config.evals`, run by the trainer at
the end of training and every `every` steps, and by anything else that has a student.

An evaluator is a class in `EVALUATORS` with
  DEFAULTS                   its options and their defaults (`config.evals.<name>` overrides);
  __init__(options, config)  its options (a ConfigDict, with `every`) and the run's config;
  start(student)             before the first training step (e.g. a measure to compare against);
  evaluate(student) -> dict  JSON-able results; their numbers also go to metrics.jsonl and
                             TensorBoard as eval/<name>/<key>/...;
  write(results, workdir)    its own files (figures, tables), on the lead process only.
`student` is a `kivfm.inference.Inherited`: `features(images)`, `as_teacher(alias)(images)`,
`teacher(alias)(images)` and `teachers` (alias -> Teacher, with its registry `spec`). Evaluators
of frozen features ('classification') use `features` only, so they also measure a teacher on its
own (`kivfm.inference.TeacherModel`; `python -m kivfm.evaluate --model=teacher:NAME`).
"""
from __future__ import annotations

import json


from kivfm import paths
from kivfm.errors import ConfigError
from kivfm.evals.classification import Classification
from kivfm.evals.detection import Detection
from kivfm.evals.report import InheritanceReport
from kivfm.evals.semantic import SemanticSegmentation
from kivfm.evals.zero_shot import ZeroShot

EVALUATORS = {'report': InheritanceReport, 'classification': Classification,
              'semantic_segmentation': SemanticSegmentation, 'detection': Detection,
              'zero_shot': ZeroShot}


def validate(evals) -> None:
  """Raises ConfigError naming the first unknown evaluator kind or option in `config.evals`."""
  for name, options in evals.items():
    kind = options.get('kind')
    if kind not in EVALUATORS:
      raise ConfigError(f'config.evals.{name}.kind={kind!r} is not allowed; choose one of: '
                        f'{", ".join(EVALUATORS)}')
    allowed = {'kind', 'every', *EVALUATORS[kind].DEFAULTS}
    for key in options:
      if key not in allowed:
        raise ConfigError(f'unknown key config.evals.{name}.{key}; allowed keys here: '
                          f'{", ".join(sorted(allowed))}')
    if options.every < 0:
      raise ConfigError(f'config.evals.{name}.every={options.every} must be >= 0 (0: at the end)')


def build(config) -> dict:
  """name -> evaluator, for every entry of `config.evals`."""
  return {name: EVALUATORS[options.kind](options, config)
          for name, options in config.evals.items()}


def is_due(evaluator, step: int, total_steps: int) -> bool:
  return step == total_steps or bool(evaluator.options.every and step % evaluator.options.every == 0)


def scalars(name: str, results: dict, prefix: str = '') -> dict:
  """The numbers in `results` as {'eval/<name>/<key>/...': value}."""
  out = {}
  for key, value in results.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, dict):
      out.update(scalars(name, value, path))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[f'eval/{name}/{path}'] = float(value)
  return out


def write(workdir: str, name: str, evaluator, results: dict) -> None:
  """DIR/eval/<name>.json, then the evaluator's own files."""
  directory = paths.path(workdir) / 'eval'
  directory.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(directory / f'{name}.json', json.dumps(results, indent=2))
  evaluator.write(results, workdir)
