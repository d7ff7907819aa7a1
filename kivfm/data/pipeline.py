"""grain input pipeline: source -> per-process shard -> shuffle -> repeat -> view -> batch."""
from __future__ import annotations

import grain
import numpy as np

from kivfm.data import synthetic, transforms


def make_source(config):
  if config.data.source == 'synthetic':
    return synthetic.SyntheticImages(config.data.num_examples, size=2 * config.data.image_size,
                                     seed=config.data.shuffle_seed)
  raise ValueError(f'unknown config.data.source={config.data.source!r}; allowed: synthetic')


class _View(grain.transforms.RandomMap):
  """One augmented view per example, shared by the student and every teacher."""

  def __init__(self, size: int, scale):
    self.size, self.scale = size, tuple(scale)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return {'image': transforms.crop_and_flip(element['image'], self.size, rng, self.scale)}


def make_iterator(config, process_index: int, process_count: int):
  """A checkpointable grain iterator of {'image': uint8 [B_local, S, S, 3]} batches."""
  local_batch = config.data.batch_size // process_count
  ds = grain.MapDataset.source(make_source(config))
  ds = ds[process_index::process_count]
  ds = ds.seed(config.data.shuffle_seed).shuffle().repeat(None)
  ds = ds.random_map(_View(config.data.image_size, config.data.crop_scale))
  ds = ds.batch(local_batch, drop_remainder=True)
  iter_ds = ds.to_iter_dataset()
  if config.data.worker_count > 0:
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.worker_count))
  return iter(iter_ds)
