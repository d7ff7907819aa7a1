"""Runs side by side: their inheritance reports and training diagnostics as one Markdown table.

  python -m kivfm.compare runs/demo runs/demo_teacher_space [--names=shared,teacher_space]

Reads each run's DIR/eval/report.json (the 'report' evaluator) and DIR/metrics.jsonl: held-out
probes, inherited heads, per-teacher fidelity and patch-feature norms, the per-teacher gradient
shares over training (mean and last), training time and speed.
"""
from __future__ import annotations

import json

import numpy as np
from absl import app, flags

from kivfm import metrics, paths
from kivfm.evals import report as report_lib

_NAMES = flags.DEFINE_list('names', None, 'Column names (default: the run folders).')


def _shares(records: list[dict], alias: str) -> str:
  values = [r[f'grad_share/{alias}'] for r in records if f'grad_share/{alias}' in r]
  return f'{np.mean(values):.2f} / {values[-1]:.2f}' if values else '-'


def rows(workdir: str) -> dict:
  """Row name -> formatted value for one run."""
  run = paths.path(workdir)
  report = json.loads((run / 'eval' / 'report.json').read_text())
  records = metrics.read_jsonl(run / 'metrics.jsonl')
  out = {}
  for name, acc in report['probes'].items():
    out[f'kNN / linear probe: {name}'] = f'{acc["knn"]:.3f} / {acc["linear"]:.3f}'
  for name, value in report['heads'].items():
    out[name] = f'{value:.3f}'
  for alias, f in report['fidelity'].items():
    out[f'fidelity to {alias}, patches / global'] = (f'{f["after"]["patches"]:.3f} / '
                                                     f'{f["after"]["cls"]:.3f}')
    n = report['feature_norms'][alias]
    out[f'patch-feature norm {alias}: teacher / prediction'] = (f'{n["teacher"]:.3g} / '
                                                                f'{n["student"]:.3g}')
    out[f'gradient share {alias}: mean / last'] = _shares(records, alias)
  speeds = [r['images_per_s'] for r in records if 'images_per_s' in r]
  out['steps'] = str(records[-1]['step'])
  out['training minutes'] = f'{report_lib.training_minutes(records)[-1]:.1f}'
  out['images/s (median)'] = f'{np.median(speeds):.1f}' if speeds else '-'
  return out


def table(workdirs: list[str], names: list[str] | None = None) -> str:
  names = names or [str(w).rstrip('/').rsplit('/', 1)[-1] for w in workdirs]
  if len(names) != len(workdirs):
    raise ValueError(f'{len(names)} names for {len(workdirs)} runs')
  columns = [rows(w) for w in workdirs]
  keys = list(dict.fromkeys(k for c in columns for k in c))
  lines = ['| | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
  lines += [f'| {k} | ' + ' | '.join(c.get(k, '-') for c in columns) + ' |' for k in keys]
  return '\n'.join(lines)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give one or more run folders')
  print(table(argv[1:], _NAMES.value))


if __name__ == '__main__':
  app.run(main)
