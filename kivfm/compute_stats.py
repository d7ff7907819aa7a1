"""Statistics of every teacher's features over the training data, for the fixed normalisers
(`unifier.normalizer` = 'zscore' or 'phi_s').

  python -m kivfm.compute_stats --config=configs/ablations/normalizer.py:norm=phi_s --workdir=DIR
Writes DIR/teacher_stats/<alias>_{cls,patches}.npz (count, mean, co-moments), which training in
the same DIR (or `--config.unifier.stats_dir`) reads. Patch maps are subsampled per image.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from kivfm import assembly, config as config_lib, sharding
from kivfm.data import pipeline
from kivfm.stats import FeatureStats, stats_dir, stats_path

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, as for kivfm.main.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; stats go to DIR/teacher_stats.')
_BATCHES = flags.DEFINE_integer('batches', 100, 'Batches of the training stream to read.')
_TOKENS = flags.DEFINE_integer('tokens_per_image', 64, 'Patch tokens sampled per image.')


def compute(config, workdir: str, batches: int, tokens_per_image: int) -> dict:
  """alias -> {'cls': FeatureStats, 'patches': FeatureStats}, saved under stats_dir."""
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config)
  rng = np.random.default_rng(config.seed)
  with jax.set_mesh(mesh):
    teacher_set = assembly.build_teachers(config, mesh)
    forward = jax.jit(lambda p, x: {a: {k: o[k] for k in ('cls', 'patches')}
                                    for a, o in teacher_set.forward(p, x).items()})
    data = pipeline.make_iterator(config, jax.process_index(), jax.process_count())
    stats = {a: {'cls': FeatureStats(), 'patches': FeatureStats()} for a in teacher_set.specs}
    for _ in range(batches):
      batch = sharding.host_to_global({'image': next(data)['image']}, mesh,
                                      config.sharding.rules)
      out = jax.device_get(forward(teacher_set.params, batch['image']))
      for alias, feats in out.items():
        stats[alias]['cls'].update(np.asarray(feats['cls'], np.float64))
        tokens = np.asarray(feats['patches'], np.float64).reshape(len(feats['patches']), -1,
                                                                 feats['patches'].shape[-1])
        take = min(tokens_per_image, tokens.shape[1])
        picks = np.stack([rng.choice(tokens.shape[1], take, replace=False) for _ in tokens])
        stats[alias]['patches'].update(np.take_along_axis(tokens, picks[..., None], axis=1))
  directory = stats_dir(config, workdir)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    for alias, kinds in stats.items():
      for kind, s in kinds.items():
        s.save(stats_path(directory, alias, kind))
  return stats


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  stats = compute(_CONFIG.value, _WORKDIR.value, _BATCHES.value, _TOKENS.value)
  for alias, kinds in stats.items():
    print(f'{alias}: {kinds["cls"].count} global vectors, {kinds["patches"].count} patch tokens, '
          f'mean |x| {np.abs(kinds["patches"].mean).mean():.3g}')
  print(f'written to {stats_dir(_CONFIG.value, _WORKDIR.value)}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
