"""Teacher-target cache: run the config's teachers ONCE over the training set, for
config.cache.views augmented views of every image, and store their targets.

  python -m kivfm.cache --config=configs/demo.py --workdir=runs/demo \\
      --config.data.max_examples=512 --config.cache.views=2
  python -m kivfm.main --config=configs/demo.py --workdir=runs/demo \\
      --config.data.max_examples=512 --config.teacher_cache=runs/demo/teacher_cache

The cache goes to config.teacher_cache, or DIR/teacher_cache; the command prints the exact flag
that trains from it. View k of example i of source s is cropped and flipped with an rng seeded
by (data.shuffle_seed, s, i, k) (`view_rng`); each record keeps its box and flip, so the reader
(`kivfm.data.cached`) rebuilds exactly the image the targets belong to. Targets ('cls' and
'patches' of every teacher, as the teachers output them) are stored as int8 with per-channel
scales or bfloat16, patch maps optionally reduced by PCA (config.cache.pca_dim, fitted on the
targets of the first config.cache.pca_fit_examples examples of chunk 0). The layout and the
manifest are described in `kivfm.data.cached`.

Chunk c holds the examples c, c + C, c + 2C, ... of the C chunks (so chunk 0 is an evenly spread
sample); each is written to a temporary file and renamed when complete, so an interrupted build
run again skips the finished chunks and ends with the identical cache. With several processes
(config.distributed), process p builds the chunks c with c % n == p on its own devices, and
process 0 writes the manifest once all are done (the directory must be shared).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from kivfm import allocator, assembly, config as config_lib, sharding
from kivfm.data import cached, examples, transforms
from kivfm.models import adapters
from kivfm.stats import FeatureStats

# One record per group (random access) and zstd: int8 patch maps of ReLU networks are sparse.
WRITER_OPTIONS = 'group_size:1,zstd:3'
LOAD_THREADS = 8


def cache_dir(config, workdir: str) -> str:
  """config.teacher_cache, or DIR/teacher_cache (a local or mounted directory)."""
  return cached.local_cache_dir(config.teacher_cache or os.path.join(workdir, 'teacher_cache'))


def view_rng(shuffle_seed: int, source: int, index: int, view: int) -> np.random.Generator:
  """The rng that draws view `view` of example `index` of source `source`."""
  return np.random.default_rng([shuffle_seed, source, index, view])


def make_forward(teacher_set: assembly.TeacherSet, trunk: tuple[str, int] | None = None):
  """jitted (params, uint8 images) -> (alias -> {'cls', 'patches'}, trunk tokens or None);
  nothing else is computed. `trunk` = (knowledge-base alias, first adapted block): that
  teacher's tokens entering the block are returned too (the student's trunk on the views),
  and the teacher continues from them."""
  def forward(params, images):
    shared = tokens = None
    if trunk is not None:
      alias, first = trunk
      teacher = nnx.merge(teacher_set.graphdefs[alias], nnx.State(params[alias]))
      tokens, grid = teacher.tokens(images, first)
      shared = (alias, tokens, grid, first)
    targets = {alias: {'cls': out['cls'], 'patches': out['patches']}
               for alias, out in teacher_set.forward(params, images, shared).items()}
    return targets, tokens
  return jax.jit(forward)


def trunk_of(config, teacher_set: assembly.TeacherSet) -> tuple[str, int] | None:
  """(knowledge-base alias, first adapted block) with config.cache.student_trunk, else None."""
  if not config.cache.student_trunk:
    return None
  alias = config.student.knowledge_base
  depth = teacher_set.specs[alias].arch.depth
  return alias, adapters.first_adapted(depth, config.student.adapter_blocks)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'kivfm.cache:{name}')


def build_key(config, identity: dict) -> str:
  """Names one build: its identity and the settings that decide chunks and the PCA sample."""
  settings = {'identity': identity, 'chunk_examples': config.cache.chunk_examples,
              'pca_fit_examples': config.cache.pca_fit_examples}
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class _Builder:
  """The build of one cache: examples -> views -> teachers -> encoded records."""

  def __init__(self, config, directory: str, parts, identity: dict, teacher_set, mesh, pool):
    self.config, self.directory, self.parts, self.identity = config, directory, parts, identity
    self.key = build_key(config, identity)
    self.teacher_set, self.mesh, self.pool = teacher_set, mesh, pool
    self.trunk = trunk_of(config, teacher_set)
    self.forward = make_forward(teacher_set, self.trunk)
    self.offsets = np.cumsum([0] + [len(part) for part in parts])
    self.num_chunks = math.ceil(self.offsets[-1] / config.cache.chunk_examples)

  def chunk_path(self, c: int) -> str:
    return os.path.join(self.directory,
                        f'targets-{self.key}-{c:05d}-of-{self.num_chunks:05d}.array_record')

  def chunk_ids(self, c: int) -> range:
    return range(c, int(self.offsets[-1]), self.num_chunks)

  def _views(self, g: int):
    """[(meta, image)] of every view of global example `g` ([] if the example is bad)."""
    data = self.config.data
    s = int(np.searchsorted(self.offsets, g, side='right')) - 1
    i = g - int(self.offsets[s])
    example = self.parts[s][i]
    if examples.is_bad(example):
      return []
    image, out = example['image'], []
    for k in range(self.config.cache.views):
      box, flip = transforms.sample_view(*image.shape[:2], view_rng(data.shuffle_seed, s, i, k),
                                         data.crop_scale)
      meta = {'source': s, 'index': i, 'view': k, 'label': int(example['label']), 'box': box,
              'flip': flip}
      out.append((meta, transforms.apply_view(image, data.image_size, box, flip)))
    return out

  def targets(self, ids):
    """Yields (meta, float32 targets, float32 trunk tokens or None) per forward pass over the
    views of examples `ids`."""
    cache, size = self.config.cache, self.config.data.image_size
    per_pass = cache.batch_size // cache.views
    images_sharding = sharding.batch_sharding(self.mesh, self.config.sharding.rules, 4)
    for start in range(0, len(ids), per_pass):
      views = [v for vs in self.pool.map(self._views, ids[start:start + per_pass]) for v in vs]
      if not views:
        continue
      batch = np.zeros((cache.batch_size, size, size, 3), np.uint8)
      batch[:len(views)] = [image for _, image in views]
      out, trunk = jax.device_get(self.forward(self.teacher_set.params,
                                               jax.device_put(batch, images_sharding)))
      meta = {key: np.asarray([m[key] for m, _ in views]) for key in views[0][0]}
      yield meta, {alias: {kind: np.asarray(x[:len(views)], np.float32)
                           for kind, x in kinds.items()} for alias, kinds in out.items()}, (
                               None if trunk is None else np.asarray(trunk[:len(views)],
                                                                      np.float32))

  def fit_pca(self) -> dict:
    """alias -> (mean, components) of config.cache.pca_dim, from chunk 0's first examples."""
    dims = dict(self.config.cache.pca_dim)
    stats = {alias: FeatureStats() for alias in dims}
    ids = self.chunk_ids(0)[:self.config.cache.pca_fit_examples]
    logging.info('teacher cache: fitting the PCA of %s on %d examples', ', '.join(sorted(dims)),
                 len(ids))
    for _, targets, _ in self.targets(ids):
      for alias, s in stats.items():
        patches = targets[alias]['patches']
        s.update(patches.reshape(-1, patches.shape[-1]))
    pca = {}
    for alias, d in sorted(dims.items()):
      eigenvalues, vectors = np.linalg.eigh(stats[alias].cov)
      kept = eigenvalues[::-1][:d].sum() / max(eigenvalues.sum(), 1e-30)
      pca[alias] = (stats[alias].mean.astype(np.float32),
                    np.ascontiguousarray(vectors[:, ::-1][:, :d], np.float32))
      logging.info('teacher cache: PCA of %s keeps %d of %d dims, %.2f%% of the patch variance '
                   '(%d vectors)', alias, d, len(eigenvalues), 100 * kept, stats[alias].count)
    return pca

  def codec(self, process_index: int) -> cached.Codec:
    """The codec of this build; process 0 fits the PCA once (codec-KEY.npz), all read it."""
    dtype, shapes = self.config.cache.dtype, self.teacher_set.shapes
    trunk = None
    if self.trunk:
      trunk = cached.trunk_shape(self.config, self.teacher_set.specs[self.trunk[0]].arch)
    if not self.config.cache.pca_dim:
      return cached.Codec(dtype, shapes, trunk=trunk)
    for alias, d in self.config.cache.pca_dim:
      if d >= shapes[alias][0]:
        raise config_lib.ConfigError(f'config.cache.pca_dim keeps {d} dims of teacher {alias}, '
                                     f'which has only {shapes[alias][0]}; use fewer or leave it '
                                     f'out')
    path = os.path.join(self.directory, f'codec-{self.key}.npz')
    if process_index == 0 and not os.path.exists(path):
      cached.Codec(dtype, shapes, self.fit_pca()).save_pca(path)
    _sync('codec')
    return cached.Codec(dtype, shapes, cached.read_pca(path, shapes), trunk)

  def write_chunks(self, codec: cached.Codec, process_index: int, process_count: int) -> None:
    """Writes this process's unfinished chunks, logging progress."""
    todo = [c for c in range(process_index, self.num_chunks, process_count)
            if not os.path.exists(self.chunk_path(c))]
    views = self.config.cache.views
    examples_todo = sum(len(self.chunk_ids(c)) for c in todo)
    logging.info('teacher cache: %d of %d chunks to build here (%d examples, %d views each)',
                 len(todo), self.num_chunks, examples_todo, views)
    progress = _Progress(examples_todo * views)
    for j, c in enumerate(todo):
      what = f'chunk {j + 1}/{len(todo)}'
      _write_chunk(self.chunk_path(c), self._records(codec, c, progress, what))
      progress.update(0, f'{what} written', force=True)

  def _records(self, codec: cached.Codec, c: int, progress: _Progress, what: str):
    """The encoded records of chunk `c`, one structured array per forward pass."""
    for meta, targets, trunk in self.targets(self.chunk_ids(c)):
      yield codec.encode(meta, targets, trunk)
      progress.update(len(meta['source']), what)

  def manifest(self, codec: cached.Codec) -> dict:
    """The manifest of the finished cache (all chunk files must be there)."""
    missing = [self.chunk_path(c) for c in range(self.num_chunks)
               if not os.path.exists(self.chunk_path(c))]
    if missing:
      raise RuntimeError(f'{len(missing)} of {self.num_chunks} chunk files are missing (e.g. '
                         f'{missing[0]}); every process must write to the same directory. Run '
                         f'the command again to build them.')
    shards = []
    for c in range(self.num_chunks):
      reader = ArrayRecordReader(self.chunk_path(c))
      shards.append({'file': os.path.basename(self.chunk_path(c)),
                     'records': reader.num_records(),
                     'bytes': os.path.getsize(self.chunk_path(c))})
      reader.close()
    records = sum(shard['records'] for shard in shards)
    encoding = codec.describe()
    encoding['codec'] = f'codec-{self.key}.npz' if codec.pca else ''
    trunk = encoding['trunk'] or {'tokens': 0, 'width': 0}
    float32_bytes = records * 4 * (sum(t['width'] * (1 + math.prod(t['grid']))
                                       for t in encoding['teachers'].values())
                                   + trunk['tokens'] * trunk['width'])
    size = sum(shard['bytes'] for shard in shards) + (
        os.path.getsize(os.path.join(self.directory, encoding['codec'])) if codec.pca else 0)
    return {'identity': self.identity, 'key': self.key, 'encoding': encoding,
            'chunk_examples': self.config.cache.chunk_examples,
            'pca_fit_examples': self.config.cache.pca_fit_examples,
            'examples': int(self.offsets[-1]),
            'skipped_examples': int(self.offsets[-1]) - records // self.config.cache.views,
            'records': records, 'bytes': size, 'float32_bytes': float32_bytes,
            'shards': shards}


class _Progress:
  """Logs records done, records/s and the ETA, at most every `every` seconds."""

  def __init__(self, total: int, every: float = 30.0):
    self.total, self.every, self.done = total, every, 0
    self.start = self.last = time.perf_counter()

  def update(self, records: int, what: str, force: bool = False) -> None:
    self.done += records
    now = time.perf_counter()
    if force or now - self.last >= self.every:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      logging.info('teacher cache: %s; %d/%d records, %.1f records/s, ETA %.0f s', what,
                   self.done, self.total, rate, max(self.total - self.done, 0) / max(rate, 1e-9))


def _write_chunk(path: str, batches) -> None:
  """Writes the records of `batches` (structured arrays) to `path`, atomically."""
  partial = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.partial')
  writer = ArrayRecordWriter(partial, WRITER_OPTIONS)
  try:
    for rows in batches:
      for row in rows:
        writer.write(row.tobytes())
  except BaseException:
    writer.close()
    os.remove(partial)
    raise
  writer.close()
  os.replace(partial, path)


def _write_json(path: str, value: dict) -> None:
  partial = f'{path}.partial'
  with open(partial, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(partial, path)


def build(config, workdir: str, process_index: int | None = None,
          process_count: int | None = None) -> dict:
  """Builds (or finishes) the cache of `config` at `cache_dir(config, workdir)` and returns its
  manifest. Process `process_index` of `process_count` (default: JAX's) builds its share of
  the chunks on its local devices; process 0 writes the manifest after all are done (a
  process that is not 0 and runs alone, e.g. in a test, returns None)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  directory = cache_dir(config, workdir)
  parts = cached.open_parts(config.data)
  identity = cached.identity(config, parts)
  existing = cached.read_manifest(directory)
  if existing is not None:
    if existing['key'] != build_key(config, identity):
      problems = cached.mismatches(identity, existing, directory) or [
          'other teachers, config.cache.chunk_examples or config.cache.pca_fit_examples']
      raise config_lib.ConfigError(
          f'{directory} holds a teacher cache built with other settings:\n' +
          '\n'.join(problems) + '\nDelete it or set --config.teacher_cache to another directory.')
    logging.info('teacher cache at %s is complete already', directory)
    return existing
  mesh = sharding.make_mesh(config, jax.local_devices())
  parallel = sharding.batch_parallelism(config.mesh, config.sharding.rules, mesh.size)
  if config.cache.batch_size % parallel:
    raise config_lib.ConfigError(f'config.cache.batch_size={config.cache.batch_size} is not '
                                 f'divisible by the {parallel} data-parallel devices of a process')
  os.makedirs(directory, exist_ok=True)
  with jax.set_mesh(mesh), concurrent.futures.ThreadPoolExecutor(LOAD_THREADS) as pool:
    teacher_set = assembly.kernels_in_compute_dtype(config, assembly.build_teachers(config, mesh))
    builder = _Builder(config, directory, parts, identity, teacher_set, mesh, pool)
    codec = builder.codec(process_index)
    builder.write_chunks(codec, process_index, process_count)
  _sync('chunks')
  if process_index == 0:
    _write_json(os.path.join(directory, cached.MANIFEST), builder.manifest(codec))
  _sync('manifest')
  return cached.read_manifest(directory)


# --------------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------------

def _define_flags() -> None:
  """The command's flags, defined only when it runs: importing this module (tests, training)
  must not claim --config / --workdir, which kivfm.main and kivfm.compute_stats define too."""
  config_flags.DEFINE_config_file('config', None, 'Config file, as for kivfm.main.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory; the cache goes to DIR/teacher_cache '
                      'unless config.teacher_cache is set.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  try:
    sharding.maybe_initialize_distributed(config)
    config_lib.validate(config, jax.device_count(), jax.process_count())
    manifest = build(config, workdir)
  except config_lib.ConfigError as e:
    sys.exit(f'config error: {e}')
  if jax.process_index() == 0:
    directory = cache_dir(config, workdir)
    print(f'teacher cache: {manifest["records"]} records ({manifest["skipped_examples"]} bad '
          f'examples skipped), {manifest["bytes"] / 1e6:.1f} MB = '
          f'{manifest["bytes"] / manifest["float32_bytes"]:.3f} of the float32 targets\n'
          f'train from it with: --config.teacher_cache={directory}' +
          (' --config.cache.student_trunk=True' if config.cache.student_trunk else ''))


if __name__ == '__main__':
  allocator.restart_with_tcmalloc()
  _define_flags()
  app.run(main)
