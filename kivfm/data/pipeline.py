"""grain input pipeline: sources -> seeded shuffle -> repeat -> (weighted mix) -> decode and
check -> ONE random-resized-crop + flip view -> this process's share of each global batch ->
full batches -> worker prefetch.

A batch is {'image': uint8 [B_local, S, S, 3], 'label', 'index', 'source': int32 [B_local],
'skipped': int}, B_local = data.batch_size // process_count. 'label' is -1 where the source has
none; 'index' is the example's position in its source and 'source' its position in
data.mixture (0 for a single source). 'skipped' counts the bad records (corrupt, truncated or
undecodable images, wrong dtype or shape) dropped while assembling THIS batch, not since the
start: batches stay full, and a run's total is the sum over its steps. It is a per-process
host int, not an array: take it out of the batch before placing the batch on the mesh.

Determinism: every random choice (shuffle per epoch, crop, flip) is seeded by data.shuffle_seed
and the element's global index, and each process reads its block of every global batch, so the
same config and data.worker_count give the same global batches for any number of processes
(bad records included within a process; a bad record is replaced by the next of that process's
blocks). The iterator state (`get_state` / `set_state`, saved in the orbax
checkpoint) resumes with exactly the next batch. Changing data.worker_count (or, with -1, the
host's core count) changes the order.
"""
from __future__ import annotations

import os

import grain
import numpy as np
from absl import flags

from kivfm.data import examples, sources, transforms

# A run of this many bad records in a row means the data, not a few files, is broken.
MAX_CONSECUTIVE_BAD = 1000


def _seed(*keys: int) -> int:
  return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class _View(grain.transforms.RandomMap):
  """One augmented view per example, shared by the student and every teacher."""

  def __init__(self, size: int, scale):
    self.size, self.scale = size, tuple(scale)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if examples.is_bad(element):
      return element
    view = transforms.crop_and_flip(element['image'], self.size, rng, self.scale)
    return {**element, 'image': view}


class _ProcessSlice(grain.MapDataset):
  """Process `index` of `count`: the `index`-th block of `local` elements of every global batch
  of `local * count` elements, so the global batches do not depend on the process count."""

  def __init__(self, parent: grain.MapDataset, local: int, index: int, count: int):
    super().__init__(parent)
    self._local, self._index, self._count = local, index, count

  def __len__(self) -> int:
    return len(self._parent) // (self._local * self._count) * self._local

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.slice(i)
    step, offset = divmod(i, self._local)
    return self._parent[(step * self._count + self._index) * self._local + offset]

  def __str__(self) -> str:
    return f'ProcessSlice(local={self._local}, index={self._index}, count={self._count})'


def process_slice(ds: grain.MapDataset, batch_size: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """This process's share of `ds` read in global batches of `batch_size`: its block of
  batch_size // process_count elements of each (see `_ProcessSlice`)."""
  if process_count == 1:
    return ds
  return _ProcessSlice(ds, batch_size // process_count, process_index, process_count)


class FullBatches(grain.IterDataset):
  """Batches of exactly `batch_size` good examples; bad markers are dropped and counted."""

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self.batch_size = batch_size

  def __iter__(self):
    return _FullBatchIterator(self._parent.__iter__(), self.batch_size)

  def __str__(self) -> str:
    return f'FullBatches(batch_size={self.batch_size})'


class _FullBatchIterator(grain.DatasetIterator):
  """Keeps nothing between batches, so its state is its parent's and resume is exact."""

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._bad_run = 0

  def __next__(self) -> dict:
    good, skipped = [], 0
    while len(good) < self._batch_size:
      element = next(self._parent)
      if not examples.is_bad(element):
        good.append(element)
        self._bad_run = 0
        continue
      skipped += 1
      self._bad_run += 1
      if self._bad_run >= MAX_CONSECUTIVE_BAD:
        raise RuntimeError(f'{self._bad_run} bad records in a row; the data source is broken '
                           f'(last: {element["bad"]}). Check config.data.')
    batch = {key: np.stack([e[key] for e in good]) for key in good[0]}
    batch['skipped'] = skipped
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def make_dataset(parts, data, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The grain dataset of batches over `parts` = [(random-access source, weight, name)] with the
  settings of `config.data` (`data`), for one process of `process_count`."""
  datasets = []
  for k, (source, _, name) in enumerate(parts):
    ds = grain.MapDataset.source(examples.Examples(source, k, name))
    if data.max_examples:
      ds = ds[:data.max_examples]
    datasets.append(ds.shuffle(seed=_seed(data.shuffle_seed, k)).repeat(None))
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(
      datasets, [weight for _, weight, _ in parts])
  ds = ds.random_map(_View(data.image_size, data.crop_scale),
                     seed=_seed(data.shuffle_seed, len(parts)))
  ds = process_slice(ds, data.batch_size, process_index, process_count)
  return with_workers(FullBatches(ds.to_iter_dataset(), data.batch_size // process_count),
                      data.worker_count)


def auto_workers(cores: int | None = None) -> int:
  """Decoding workers for a host with `cores` usable cores (default: this one's): none on a
  small machine, whose few cores the training process needs; else half the cores, at most 32
  (the other half runs the training process's dispatch, transfers and input assembly)."""
  cores = len(os.sched_getaffinity(0)) if cores is None else cores
  return 0 if cores <= 4 else min(cores // 2, 32)


def with_workers(batches: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  """`batches` assembled by `worker_count` grain worker processes (0: in this process; -1:
  `auto_workers()`, so the batch order depends on the host's core count)."""
  if worker_count < 0:
    worker_count = auto_workers()
  if worker_count == 0:
    return batches
  if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside absl.app.run (tests)
    flags.FLAGS.mark_as_parsed()
  return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def make_iterator(config, process_index: int, process_count: int):
  """A checkpointable grain iterator of batches (see the module docstring). Opens every source
  first, so a missing or unprepared dataset fails here with the command that prepares it."""
  data = config.data
  sources.validate(data)
  parts = [(sources.open_source(spec, data), weight, spec)
           for spec, weight in sources.components(data)]
  return iter(make_dataset(parts, data, process_index, process_count))
