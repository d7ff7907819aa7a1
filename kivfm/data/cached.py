"""Reading a teacher-target cache (built by `python -m kivfm.cache`): batches of the recorded
views with the teachers' targets on them, and the check that a cache fits a config.

A cache directory holds
  manifest.json                                what it was built from and what it holds
  targets-KEY-CCCCC-of-NNNNN.array_record      chunk files, one record per view
  codec-KEY.npz                                PCA means and components (with cache.pca_dim)
KEY names one build (config identity, chunking, PCA sample), so chunks of different builds never
mix. A record is one row of a numpy structured dtype (`Codec.record_dtype`, little-endian, no
pickle): where the view comes from (source, index, view, label), its crop box (top, left, h, w)
and flip, per teacher its global vector 'cls' [D] and patch map 'patches' [h, w, D'], and
with config.cache.student_trunk the student's 'trunk' tokens [T, D] (entering its first adapted
block), as
  bfloat16, or
  int8 with float16 scales: one per channel of a patch map or of the trunk (over its vectors),
  one for the global vector;
D' < D where config.cache.pca_dim keeps D' principal components of that teacher's patch
vectors (decoded back to D channels on read); global vectors always keep full width.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import grain
import ml_dtypes
import numpy as np

from kivfm import paths, teachers
from kivfm.data import examples, pipeline, sources, transforms
from kivfm.errors import ConfigError, DataUnavailableError
from kivfm.teachers import registry
from kivfm.weights import readers
from kivfm.weights.sources import WeightSource, weights_sha256

FORMAT = 1   # of records and manifest: bump it when encoding or decoding changes
MANIFEST = 'manifest.json'
# Records of each source whose contents are hashed into the dataset fingerprint.
SAMPLE_RECORDS = 16
# Besides the teachers' code (teachers.converter_version: models, preprocessing, weight ports):
# the code that decides the views and the teachers' architectures. Any change makes existing
# caches stale; the builder and this reader are versioned by FORMAT instead, so editing them
# does not throw away caches that may have taken hours to build.
_TARGET_CODE = ('kivfm.data.transforms', 'kivfm.data.examples', 'kivfm.data.images',
                'kivfm.teachers.registry')


@functools.cache
def code_version() -> str:
  """Hash of the code that decides views and targets (`_TARGET_CODE` + weight conversion)."""
  digest = hashlib.sha256(teachers.converter_version().encode())
  for module in _TARGET_CODE:
    digest.update(Path(importlib.util.find_spec(module).origin).read_bytes())
  return digest.hexdigest()


def build_command(directory: str) -> str:
  return (f'python -m kivfm.cache --config=<this config> --workdir=<its workdir> '
          f'--config.teacher_cache={directory}')


# --------------------------------------------------------------------------------------------
# What a cache is built from.
# --------------------------------------------------------------------------------------------

def open_parts(data) -> list[examples.Examples]:
  """The checked examples of every source `config.data` names, each cut to data.max_examples."""
  sources.validate(data)
  parts = []
  for k, (spec, _) in enumerate(sources.components(data)):
    part = examples.Examples(sources.open_source(spec, data), k, spec)
    parts.append(_First(part, data.max_examples) if data.max_examples else part)
  return parts


class _First:
  """The first `n` examples of `part`."""

  def __init__(self, part: examples.Examples, n: int):
    self.part, self.n, self.name = part, min(n, len(part)), part.name

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.part[index]


def sample_sha256(parts) -> str:
  """Hash over the contents of SAMPLE_RECORDS evenly spaced examples of every source."""
  digest = hashlib.sha256()
  for part in parts:
    count = min(len(part), SAMPLE_RECORDS)
    for index in np.unique(np.linspace(0, len(part) - 1, count).round().astype(int)):
      example = part[int(index)]
      if examples.is_bad(example):
        digest.update(f'{index}|bad|{example["bad"]}'.encode())
        continue
      digest.update(f'{index}|{example["image"].shape}|{int(example["label"])}|'.encode())
      digest.update(example['image'].tobytes())
  return digest.hexdigest()


def weights_id(config, alias: str) -> str:
  """The teacher's weights: 'sha256:<hex>' of the weight file, or 'random:<init seed>'."""
  tcfg = config.teachers[alias]
  if tcfg.weights == 'random':   # the seed assembly.build_teachers initialises it with
    return f'random:{config.seed + 1000 * (sorted(config.teachers).index(alias) + 1)}'
  spec = registry.get(tcfg.name)
  if tcfg.weights == 'pretrained':
    if not spec.sources:
      raise ConfigError(f"config.teachers.{alias}.weights='pretrained' but teacher "
                        f"{tcfg.name!r} has no pretrained source")
    return f'sha256:{weights_sha256(spec.sources[0].resolve())}'
  return f'sha256:{weights_sha256(WeightSource.from_path(tcfg.weights).resolve())}'


def teacher_image_size(tcfg):
  """The side a teacher resizes views to (its registry size when config says 0)."""
  if tcfg.image_size:
    return tcfg.image_size
  h, w = registry.get(tcfg.name).image_size
  return h if h == w else [h, w]


def identity(config, parts) -> dict:
  """Everything that decides a cache's records, keyed by the config key (or data property) it
  comes from; a cache serves a config exactly when these agree (the teachers of the config
  may be a subset of the cache's). JSON values."""
  data, cache = config.data, config.cache
  out = {'format': FORMAT}
  pca = dict(cache.pca_dim)
  for alias, tcfg in sorted(config.teachers.items()):
    key = f'config.teachers.{alias}'
    out.update({f'{key}.name': tcfg.name, f'{key}.weights': weights_id(config, alias),
                f'{key}.image_size': teacher_image_size(tcfg), f'{key}.dtype': tcfg.dtype,
                f'config.cache.pca_dim[{alias}]': int(pca.get(alias, 0))})
  out.update({
      'config.data.image_size': data.image_size,
      'config.data.crop_scale': [float(x) for x in data.crop_scale],
      'config.data.shuffle_seed': data.shuffle_seed,
      'config.cache.views': cache.views,
      'config.cache.dtype': cache.dtype,
      'data sources': [spec for spec, _ in sources.components(data)],
      'data sizes (config.data.max_examples)': [len(part) for part in parts],
      'data contents (sha256 over a sample)': sample_sha256(parts),
      'code version (kivfm.data.cached.code_version)': code_version(),
  })
  if cache.student_trunk:
    check_trunk(config)
    out['config.student.adapter_blocks'] = config.student.adapter_blocks
  return json.loads(json.dumps(out))


def trunk_shape(config, arch) -> tuple[int, int]:
  """(tokens, width) of the student's trunk per view, for its knowledge base's `arch`."""
  grid = config.data.image_size // arch.patch_size
  return grid * grid + arch.class_token + arch.num_registers, arch.width


def check_trunk(config) -> None:
  """Raises ConfigError unless the student's trunk (the blocks below its first adapter) computes
  what its knowledge-base teacher computes on the view, so the cache can store it."""
  alias = config.student.knowledge_base
  tcfg = config.teachers[alias]
  size = teacher_image_size(tcfg)
  problems = []
  if tcfg.dtype != config.dtype:
    problems.append(f'config.teachers.{alias}.dtype={tcfg.dtype!r} differs from '
                    f'config.dtype={config.dtype!r}')
  if size != config.data.image_size:
    problems.append(f'config.teachers.{alias}.image_size={size!r} differs from '
                    f'config.data.image_size={config.data.image_size!r}')
  if problems:
    raise ConfigError(f'config.cache.student_trunk=True: the student\'s frozen blocks compute '
                      f'what the knowledge-base teacher {alias!r} computes only at its dtype and '
                      f'resolution, but ' + ' and '.join(problems))


def mismatches(expected: dict, manifest: dict, directory: str) -> list[str]:
  """One line per identity field of the config that the cache at `directory` does not match."""
  cached, have = manifest.get('identity', {}), manifest['encoding']['teachers']
  missing = sorted({key.split('.')[2] for key in expected
                    if key.startswith('config.teachers.')} - set(have))
  lines = [f'config.teachers.{alias}: the cache at {directory} has no targets of teacher '
           f'{alias!r} (it has: {", ".join(have)})' for alias in missing]
  for key, value in expected.items():
    if any(key.startswith(f'config.teachers.{alias}.') or key == f'config.cache.pca_dim[{alias}]'
           for alias in missing):
      continue
    if cached.get(key) != value:
      sep = '=' if key.startswith('config.') else ': this config gives '
      lines.append(f'{key}{sep}{value!r} but the cache at {directory} was built with '
                   f'{cached.get(key)!r}')
  return lines


def read_manifest(directory: str) -> dict | None:
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_manifest(config, cache_dir: str) -> dict:
  """The manifest of the cache at `cache_dir` if it is complete and was built for `config`.
  Raises DataUnavailableError (with the command that builds it) for a missing or incomplete
  cache, and ConfigError naming every field that differs (teachers, weights, view parameters,
  data, cache encoding, code version)."""
  return _check(config, cache_dir, open_parts(config.data))


def _check(config, directory: str, parts) -> dict:
  manifest = read_manifest(directory)
  if manifest is None:
    chunks = sorted(Path(directory).glob('targets-*.array_record')) if os.path.isdir(
        directory) else []
    state = (f'is incomplete ({len(chunks)} chunk files, no {MANIFEST}: its build was '
             f'interrupted; the same command finishes it)' if chunks else 'does not exist')
    raise DataUnavailableError(f'the teacher-target cache at {directory} (config.teacher_cache) '
                               f'{state}. Build it with: {build_command(directory)}')
  # How the cache was encoded (config.cache.*) is the manifest's business, not training's.
  expected = {key: value for key, value in identity(config, parts).items()
              if not key.startswith('config.cache.')}
  if config.cache.student_trunk and not manifest['encoding'].get('trunk'):
    raise ConfigError(f'config.cache.student_trunk=True but the cache at {directory} holds no '
                      f'student trunk tokens; rebuild it with that setting '
                      f'({build_command("<new dir>")} --config.cache.student_trunk=True) or train '
                      f'without them (--config.cache.student_trunk=False)')
  problems = mismatches(expected, manifest, directory)
  if problems:
    raise ConfigError('\n'.join(problems) + f'\nRebuild the cache for this config '
                      f'({build_command("<new dir>")}) or train without it '
                      f"(--config.teacher_cache='').")
  for shard in manifest['shards']:
    path = os.path.join(directory, shard['file'])
    if not os.path.exists(path) or os.path.getsize(path) != shard['bytes']:
      raise DataUnavailableError(f'the teacher-target cache at {directory} is damaged: {path} '
                                 f'is missing or has the wrong size. Delete the cache and '
                                 f'rebuild it with: {build_command(directory)}')
  return manifest


# --------------------------------------------------------------------------------------------
# Records: encoding and decoding.
# --------------------------------------------------------------------------------------------

META = [('source', '<i4'), ('index', '<i4'), ('view', '<i4'), ('label', '<i4'),
        ('box', '<i4', (4,)), ('flip', 'u1')]


def _int8(x: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
  """x -> (int8 codes, float16 scales over `axis`) with |x - codes * scales| <= scales / 2."""
  absmax = np.abs(x).max(axis=axis, keepdims=True)
  if not np.isfinite(absmax).all():
    raise ValueError('non-finite targets cannot be stored as int8')
  scale = (absmax / 127).astype(np.float16)
  scale = np.where(scale.astype(np.float32) * 127 < absmax,
                   np.nextafter(scale, np.float16(np.inf)), scale)
  if not np.isfinite(scale).all():
    raise ValueError(f'targets up to {absmax.max():.3g} overflow float16 int8 scales; use '
                     f"config.cache.dtype='bfloat16'")
  codes = np.round(x / np.where(scale == 0, 1, scale).astype(np.float32))
  return codes.astype(np.int8), scale


class Codec:
  """Targets <-> record fields for the teachers `shapes` = alias -> (width, (h, w)), with
  `pca` = alias -> (mean [D], components [D, D']) for the PCA-reduced patch maps, and the
  student's `trunk` tokens = (tokens, width) when the cache holds them."""

  def __init__(self, dtype: str, shapes: dict, pca: dict | None = None,
               trunk: tuple[int, int] | None = None):
    self.dtype, self.shapes, self.pca = dtype, dict(shapes), dict(pca or {})
    self.trunk = tuple(trunk) if trunk else None
    fields = [f for a in sorted(self.shapes) for f in self._fields(a)]
    if self.trunk:
      fields += self._map_fields('trunk', self.trunk)
    self.record_dtype = np.dtype(META + fields)

  def stored_width(self, alias: str) -> int:
    return self.pca[alias][1].shape[1] if alias in self.pca else self.shapes[alias][0]

  def _fields(self, alias: str) -> list:
    width, grid = self.shapes[alias]
    cls = [(f'{alias}/cls', '<u2', (width,))] if self.dtype == 'bfloat16' else [
        (f'{alias}/cls', 'i1', (width,)), (f'{alias}/cls_scale', '<f2')]
    return cls + self._map_fields(f'{alias}/patches', (*grid, self.stored_width(alias)))

  def _map_fields(self, name: str, shape: tuple) -> list:
    """A map of vectors [..., C]: bfloat16, or int8 with one scale per channel."""
    if self.dtype == 'bfloat16':
      return [(name, '<u2', shape)]
    return [(name, 'i1', shape), (f'{name}_scale', '<f2', shape[-1:])]

  def _encode_map(self, rows: np.ndarray, name: str, x: np.ndarray) -> None:
    if self.dtype == 'bfloat16':
      rows[name] = x.astype(ml_dtypes.bfloat16).view('<u2')
      return
    rows[name], scale = _int8(x, tuple(range(1, x.ndim - 1)))
    rows[f'{name}_scale'] = scale.reshape(len(x), -1)

  def _decode_map(self, rows: np.ndarray, name: str) -> np.ndarray:
    if self.dtype == 'bfloat16':
      return rows[name].view(ml_dtypes.bfloat16).astype(np.float32)
    scale = rows[f'{name}_scale'].astype(np.float32)
    return rows[name] * scale.reshape(len(rows), *[1] * (rows[name].ndim - 2), -1)

  def encode(self, meta: dict, targets: dict, trunk: np.ndarray | None = None) -> np.ndarray:
    """meta: field -> [B, ...] (META); targets: alias -> {'cls': [B, D], 'patches':
    [B, h, w, D]} float32; trunk: [B, T, D] float32 (with `self.trunk`) -> records [B]."""
    rows = np.zeros(len(meta['source']), self.record_dtype)
    for key, value in meta.items():
      rows[key] = value
    for alias in self.shapes:
      cls, patches = targets[alias]['cls'], targets[alias]['patches']
      if alias in self.pca:
        mean, components = self.pca[alias]
        patches = (patches - mean) @ components
      try:
        if self.dtype == 'bfloat16':
          rows[f'{alias}/cls'] = cls.astype(ml_dtypes.bfloat16).view('<u2')
        else:
          rows[f'{alias}/cls'], scale = _int8(cls, -1)
          rows[f'{alias}/cls_scale'] = scale[:, 0]
        self._encode_map(rows, f'{alias}/patches', patches)
      except ValueError as e:
        raise ValueError(f'teacher {alias}: {e}') from e
    if self.trunk:
      try:
        self._encode_map(rows, 'trunk', trunk)
      except ValueError as e:
        raise ValueError(f'student trunk: {e}') from e
    return rows

  def decode(self, rows: np.ndarray, aliases) -> dict:
    """Structured records [B] -> alias -> {'cls': [B, D], 'patches': [B, h, w, D]} float32."""
    out = {}
    for alias in aliases:
      if self.dtype == 'bfloat16':
        cls = rows[f'{alias}/cls'].view(ml_dtypes.bfloat16).astype(np.float32)
      else:
        cls = rows[f'{alias}/cls'] * rows[f'{alias}/cls_scale'].astype(np.float32)[:, None]
      patches = self._decode_map(rows, f'{alias}/patches')
      if alias in self.pca:
        mean, components = self.pca[alias]
        patches = patches @ components.T + mean
      out[alias] = {'cls': cls.astype(np.float32), 'patches': patches.astype(np.float32)}
    return out

  def decode_trunk(self, rows: np.ndarray) -> np.ndarray:
    """Structured records [B] -> the student's trunk tokens [B, T, D] float32."""
    return self._decode_map(rows, 'trunk').astype(np.float32)

  def describe(self) -> dict:
    """The manifest's 'encoding' entry (with the codec file name, `from_manifest` rebuilds it)."""
    return {'dtype': self.dtype, 'record_bytes': self.record_dtype.itemsize,
            'teachers': {a: {'width': w, 'grid': list(g), 'stored_width': self.stored_width(a)}
                         for a, (w, g) in sorted(self.shapes.items())},
            'trunk': {'tokens': self.trunk[0], 'width': self.trunk[1]} if self.trunk else None}

  def save_pca(self, path: str) -> None:
    readers.save_npz(path, {f'{a}/{k}': v for a, (mean, comp) in sorted(self.pca.items())
                            for k, v in (('mean', mean), ('components', comp))})

  @classmethod
  def from_manifest(cls, manifest: dict, directory: str) -> Codec:
    encoding = manifest['encoding']
    shapes = {a: (t['width'], tuple(t['grid'])) for a, t in encoding['teachers'].items()}
    pca = read_pca(os.path.join(directory, encoding['codec']), shapes) if encoding['codec'] else {}
    trunk = encoding.get('trunk')
    codec = cls(encoding['dtype'], shapes, pca, trunk and (trunk['tokens'], trunk['width']))
    if codec.record_dtype.itemsize != encoding['record_bytes']:
      raise DataUnavailableError(f'the teacher-target cache at {directory} does not match its '
                                 f'manifest (records of {encoding["record_bytes"]} bytes, '
                                 f'expected {codec.record_dtype.itemsize}); rebuild it with: '
                                 f'{build_command(directory)}')
    return codec


def read_pca(path: str, shapes) -> dict:
  """alias -> (mean, components) of the teachers of `shapes` in a codec file (`save_pca`)."""
  arrays = readers.read_npz(path)
  return {a: (arrays[f'{a}/mean'], arrays[f'{a}/components'])
          for a in shapes if f'{a}/mean' in arrays}


# --------------------------------------------------------------------------------------------
# The grain pipeline over a cache.
# --------------------------------------------------------------------------------------------

class _View(grain.transforms.Map):
  """Record bytes -> the example with exactly the recorded view (or a bad marker); with
  `image` False (the record holds the student's trunk) the record alone, no view rebuilt."""

  def __init__(self, parts, record_dtype: np.dtype, size: int, directory: str,
               image: bool = True):
    self.parts, self.record_dtype, self.size, self.directory = parts, record_dtype, size, directory
    self.image = image

  def map(self, raw: bytes) -> dict:
    if len(raw) != self.record_dtype.itemsize:
      raise DataUnavailableError(f'a record of the teacher-target cache at {self.directory} has '
                                 f'{len(raw)} bytes, expected {self.record_dtype.itemsize}; '
                                 f'the cache is damaged: rebuild it')
    row = np.frombuffer(raw, self.record_dtype)[0]
    source, index = int(row['source']), int(row['index'])
    if not self.image:
      return {'label': row['label'], 'index': np.int32(index), 'source': np.int32(source),
              'record': np.frombuffer(raw, np.uint8)}
    example = self.parts[source][index]
    if examples.is_bad(example):
      return example
    (top, left, h, w), (height, width) = row['box'], example['image'].shape[:2]
    if top + h > height or left + w > width:
      return {'bad': f'{self.parts[source].name}[{index}]: image of {height}x{width} has no '
                     f'recorded crop box {tuple(row["box"])}; the source changed since the '
                     f'cache was built'}
    image = transforms.apply_view(example['image'], self.size, row['box'], bool(row['flip']))
    return {'image': image, 'label': example['label'], 'index': np.int32(index),
            'source': np.int32(source), 'record': np.frombuffer(raw, np.uint8)}


class _Targets(grain.transforms.Map):
  """A batch's stacked record bytes -> its float32 targets of the teachers `aliases` (and with
  `trunk` the student's trunk tokens)."""

  def __init__(self, codec: Codec, aliases, trunk: bool):
    self.codec, self.aliases, self.trunk = codec, tuple(aliases), trunk

  def map(self, batch: dict) -> dict:
    rows = batch.pop('record').view(self.codec.record_dtype).reshape(-1)
    out = {**batch, 'targets': self.codec.decode(rows, self.aliases)}
    if self.trunk:
      out['trunk'] = self.codec.decode_trunk(rows)
    return out


def make_dataset(config, directory: str, manifest: dict, parts, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Batches over all records of the cache (see `make_iterator`)."""
  data = config.data
  codec = Codec.from_manifest(manifest, directory)
  paths = [os.path.join(directory, shard['file']) for shard in manifest['shards']]
  records = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
  seed = int(np.random.SeedSequence([data.shuffle_seed]).generate_state(1)[0])
  records = pipeline.process_slice(records.shuffle(seed=seed).repeat(None), data.batch_size,
                                   process_index, process_count)
  trunk = config.cache.student_trunk
  views = records.map(_View(parts, codec.record_dtype, data.image_size, directory,
                            image=not trunk))
  batches = pipeline.FullBatches(views.to_iter_dataset(), data.batch_size // process_count)
  batches = batches.map(_Targets(codec, sorted(config.teachers), trunk))
  return pipeline.with_workers(batches, data.worker_count)


def local_cache_dir(directory: str) -> str:
  """`directory` made absolute; array_record reads and writes local files only, so an object
  store is an error that says how to make it local."""
  if paths.is_remote(directory):
    raise ConfigError(
        f'teacher cache {directory!r} (config.teacher_cache, default WORKDIR/teacher_cache): '
        f'its array_record shards are read and '
        f'written as local files; copy it to local disk (gsutil -m cp -r) or mount the bucket '
        f'(gcsfuse) and point config.teacher_cache at that directory')
  return os.path.abspath(os.path.expanduser(directory))


def make_iterator(config, process_index: int, process_count: int):
  """A checkpointable grain iterator (get_state / set_state) over the cache at
  config.teacher_cache, after `check_manifest`. Batches: {'image': uint8 [B_local, S, S, 3]
  (the recorded view, rebuilt from the source example), 'targets': alias -> {'cls': float32
  [B_local, D], 'patches': float32 [B_local, h, w, D]}, 'label', 'index', 'source': int32
  [B_local], 'skipped': int}; with config.cache.student_trunk 'trunk': float32 [B_local, T, D]
  (the student's tokens entering its first adapted block) instead of 'image'. All N*K records,
  sharded per process, shuffled per epoch with data.shuffle_seed, repeated; an example that
  became bad is skipped and counted (`pipeline.FullBatches`)."""
  if not config.teacher_cache:
    raise ConfigError("config.teacher_cache is empty; set it to a cache directory built by "
                      "python -m kivfm.cache")
  directory = local_cache_dir(config.teacher_cache)
  parts = open_parts(config.data)
  manifest = _check(config, directory, parts)
  return iter(make_dataset(config, directory, manifest, parts, process_index, process_count))
