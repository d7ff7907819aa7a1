"""Statistics of every teacher's features over the training data, for the fixed normalisers
(`unifier.normalizer` = 'zscore' or 'phi_s').

  python -m kivfm.compute_stats --config=configs/ablations/normalizer.py:norm=phi_s --workdir=DIR
Writes DIR/teacher_stats/<alias>_{cls,patches}.npz (count, mean, co-moments), which training in
the same DIR (or `--config.unifier.stats_dir`) reads. Patch maps are subsampled per image. With
several processes (launched like kivfm.main) each reads its share of every batch and the
statistics are merged exactly across processes.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from kivfm import assembly, config as config_lib, sharding
from kivfm.data import pipeline
from kivfm.stats import FeatureStats, stats_dir, stats_path

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, as for kivfm.main.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory; stats go to DIR/teacher_stats.')
_BATCHES = flags.DEFINE_integer('batches', 100, 'Batches of the training stream to read.')
_TOKENS = flags.DEFINE_integer('tokens_per_image', 64, 'Patch tokens sampled per image.')


def process_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, each once (replicas across other mesh axes
  dropped), in global order."""
  shards = {shard.index[0].start or 0: shard for shard in x.addressable_shards}
  return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])


def _gather_float64(x) -> np.ndarray:
  """[processes, *x.shape]: every process's float64 `x`, exactly (sent as its bits)."""
  x = np.asarray(x, np.float64)
  bits = np.asarray(multihost_utils.process_allgather(x.reshape(-1).view(np.uint32)))
  return bits.view(np.float64).reshape(-1, *x.shape)


def merge_across_processes(stats: FeatureStats) -> FeatureStats:
  """The statistics of every process's data (the same result on all processes)."""
  if jax.process_count() == 1:
    return stats
  counts, means, m2s = (_gather_float64(a) for a in stats.moments())
  merged = FeatureStats()
  for count, mean, m2 in zip(counts, means, m2s):
    merged.merge(FeatureStats.from_moments(count, mean, m2))
  return merged


def compute(config, workdir: str, batches: int, tokens_per_image: int) -> dict:
  """alias -> {'cls': FeatureStats, 'patches': FeatureStats} over `batches` global batches (each
  process reads its share), saved under stats_dir by process 0."""
  sharding.maybe_initialize_distributed(config)
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config)
  rng = np.random.default_rng([config.seed, jax.process_index()])
  with jax.set_mesh(mesh):
    teacher_set = assembly.build_teachers(config, mesh)
    forward = jax.jit(lambda p, x: {a: {k: o[k] for k in ('cls', 'patches')}
                                    for a, o in teacher_set.forward(p, x).items()})
    data = pipeline.make_iterator(config, jax.process_index(), jax.process_count())
    stats = {a: {'cls': FeatureStats(), 'patches': FeatureStats()} for a in teacher_set.specs}
    for _ in range(batches):
      batch = sharding.host_to_global({'image': next(data)['image']}, mesh,
                                      config.sharding.rules)
      out = jax.tree.map(process_rows, forward(teacher_set.params, batch['image']))
      for alias, feats in out.items():
        stats[alias]['cls'].update(np.asarray(feats['cls'], np.float64))
        tokens = np.asarray(feats['patches'], np.float64).reshape(len(feats['patches']), -1,
                                                                 feats['patches'].shape[-1])
        take = min(tokens_per_image, tokens.shape[1])
        picks = np.stack([rng.choice(tokens.shape[1], take, replace=False) for _ in tokens])
        stats[alias]['patches'].update(np.take_along_axis(tokens, picks[..., None], axis=1))
  stats = {alias: {kind: merge_across_processes(s) for kind, s in kinds.items()}
           for alias, kinds in stats.items()}
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
