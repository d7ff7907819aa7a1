"""Random-access image sources named by `config.data`, and the spec strings of mixtures.

Sources (`config.data.source`, or one spec per entry of `config.data.mixture`):
  synthetic                 smooth random images (`data.num_examples`), no files
  tfds    tfds:NAME[:SPLIT] a TFDS dataset prepared as array_record (`data.tfds_name`,
                            `data.tfds_split`, `data.tfds_data_dir`), read through its
                            ArrayRecord data source (what tfds.data_source returns)
  folder  folder:PATH       class sub-folders of image files (`data.folder`); labels index the
                            sorted sub-folder names; files directly in PATH are ignored
  fashion_mnist[:SPLIT]     the offline builder's Fashion-MNIST (kivfm.data.offline), split
                            `data.tfds_split` ('train' or 'test')
  photos                    the offline builder's real photographs (scikit-image, scikit-learn)
  mixture                   data.mixture = (('tfds:imagenet2012', 0.7), ('folder:/data/x', 0.3)):
                            specs above with positive weights; a spec without SPLIT reads
                            data.tfds_split (tfds) or 'train' (fashion_mnist). Each source is
                            shuffled on its own, then grain's MapDataset.mix interleaves them
                            deterministically in the weights' proportions.

Preparing a TFDS dataset as array_record (needs TensorFlow on the preparing machine only), e.g.
ImageNet-1k with ILSVRC2012_img_{train,val}.tar placed in DIR/downloads/manual:
  pip install tensorflow tensorflow-datasets
  tfds build imagenet2012 --data_dir=DIR --file_format=array_record \
      --manual_dir=DIR/downloads/manual
Then set data.source='tfds', data.tfds_name='imagenet2012', data.tfds_data_dir=DIR.

Every source returns records {'image': encoded bytes or a uint8 array, 'label': int (optional)};
`kivfm.data.examples` turns them into checked RGB examples.
"""
from __future__ import annotations

import os

from kivfm.data import images, synthetic
from kivfm.errors import ConfigError, DataUnavailableError

SOURCES = ('synthetic', 'tfds', 'folder', 'fashion_mnist', 'photos', 'mixture')
SPEC_KINDS = ('synthetic', 'tfds', 'folder', 'fashion_mnist', 'photos')


# --------------------------------------------------------------------------------------------
# Specs: 'kind[:argument]'.
# --------------------------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str]:
  """'tfds:imagenet2012:train' -> ('tfds', 'imagenet2012:train'); 'photos' -> ('photos', '')."""
  kind, _, argument = str(spec).partition(':')
  if kind not in SPEC_KINDS:
    raise ConfigError(f'config.data.mixture: unknown source spec {spec!r}; a spec is one of '
                      f'synthetic, tfds:NAME[:SPLIT], folder:PATH, fashion_mnist[:SPLIT], photos')
  if kind in ('tfds', 'folder') and not argument:
    raise ConfigError(f'config.data.mixture: spec {spec!r} needs an argument '
                      f'({"tfds:NAME[:SPLIT]" if kind == "tfds" else "folder:PATH"})')
  return kind, argument


def components(data) -> list[tuple[str, float]]:
  """(spec, weight) of every source `config.data` names (one for a single source)."""
  if data.source == 'mixture':
    return [(str(spec), float(weight)) for spec, weight in data.mixture]
  argument = {'tfds': f':{data.tfds_name}:{data.tfds_split}', 'folder': f':{data.folder}',
              'fashion_mnist': f':{data.tfds_split}'}.get(data.source, '')
  return [(data.source + argument, 1.0)]


def validate(data) -> None:
  """Raises ConfigError naming the first wrong key of `config.data` (no file-system checks)."""
  if data.source not in SOURCES:
    raise ConfigError(f'config.data.source={data.source!r} is not allowed; choose one of: '
                      f'{", ".join(SOURCES)}')
  if data.source == 'tfds' and not data.tfds_name:
    raise ConfigError("config.data.source='tfds' needs config.data.tfds_name "
                      "(e.g. 'imagenet2012')")
  if data.source == 'folder' and not data.folder:
    raise ConfigError("config.data.source='folder' needs config.data.folder (a directory of "
                      "class sub-folders)")
  if data.source == 'mixture':
    if not data.mixture:
      raise ConfigError("config.data.source='mixture' needs config.data.mixture, e.g. "
                        "(('tfds:imagenet2012', 0.7), ('folder:/data/extra', 0.3))")
    for entry in data.mixture:
      if len(entry) != 2 or not isinstance(entry[1], (int, float)) or entry[1] <= 0:
        raise ConfigError(f'config.data.mixture entry {entry!r} must be (spec, weight > 0)')
      parse_spec(entry[0])
  if data.max_examples < 0:
    raise ConfigError(f'config.data.max_examples={data.max_examples} must be >= 0')
  if data.worker_count < -1:
    raise ConfigError(f'config.data.worker_count={data.worker_count} must be >= 0, or -1 (as '
                      f'many as the host has cores for)')


# --------------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------------

class FolderSource:
  """Image files in class sub-folders of `root`: record i = {'image': bytes, 'label': class}."""

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
      raise DataUnavailableError(f'image folder {root!r} (config.data.folder) does not exist')
    self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.paths, self.labels = [], []
    for label, name in enumerate(self.classes):
      found = images.list_images(os.path.join(root, name))
      self.paths.extend(found)
      self.labels.extend([label] * len(found))
    if not self.paths:
      raise DataUnavailableError(
          f'no image files ({", ".join(images.EXTENSIONS)}) in class sub-folders of {root!r}; '
          f'expected {root}/<class>/<image>')

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    with open(self.paths[index], 'rb') as f:
      return {'image': f.read(), 'label': self.labels[index], 'name': self.paths[index]}


def tfds_command(name: str, data_dir: str) -> str:
  return (f'tfds build {name} --data_dir={data_dir or "~/tensorflow_datasets"} '
          f'--file_format=array_record')


def open_tfds(name: str, split: str, data_dir: str = ''):
  """`tfds.data_source` of a dataset prepared as array_record; images stay encoded (decoded and
  checked by kivfm.data.examples, so a corrupt one is skipped, not fatal)."""
  import tensorflow_datasets as tfds
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  command = tfds_command(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataUnavailableError(
        f'TFDS dataset {name!r} is neither a registered builder nor prepared in '
        f'{data_dir or "~/tensorflow_datasets"} (config.data.tfds_data_dir); prepare it with: '
        f'{command}') from e
  manual = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if manual:
    command += f' --manual_dir={data_dir or "~/tensorflow_datasets"}/downloads/manual'
  if not builder.is_prepared():
    raise DataUnavailableError(
        f'TFDS dataset {name!r} is not prepared in {builder.data_dir}; prepare it (with '
        f'TensorFlow installed) with: {command}' +
        (f'\nManual download: {manual.strip()}' if manual else ''))
  formats = {str(getattr(f, 'value', f)) for f in
             [builder.info.file_format, *builder.info.alternative_file_formats] if f}
  if 'array_record' not in formats:
    raise DataUnavailableError(
        f'TFDS dataset {name!r} in {builder.data_dir} is stored as {sorted(formats)}, which has '
        f'no random access; prepare it as array_record with: {command}')
  for base in {part.split('[')[0].strip() for part in split.split('+')}:
    if base not in builder.info.splits:
      raise DataUnavailableError(f'TFDS dataset {name!r} has no split {base!r} (config.data.'
                                 f'tfds_split); it has: {", ".join(builder.info.splits)}')
  features = builder.info.features
  decoders = None
  if 'image' in features and isinstance(features['image'], tfds.features.Image):
    decoders = {'image': tfds.decode.SkipDecoding()}
  return builder.as_data_source(split, decoders=decoders)


def open_offline(kind: str, split: str, data) -> object:
  """A split of the offline builder, prepared on first use if `data.prepare_offline`."""
  from kivfm.data import offline  # late: imports tensorflow_datasets
  kwargs = dict(max_examples=data.max_examples, fashion_mnist_dir=data.fashion_mnist_dir)
  b = offline.builder(kind, data.tfds_data_dir, **kwargs)
  if not b.is_prepared():
    if not data.prepare_offline:
      raise DataUnavailableError(
          f'offline dataset {b.info.full_name} is not prepared in {b.data_dir}; prepare it with: '
          f'{offline.command(kind, data.tfds_data_dir, **kwargs)}')
    b = offline.prepare(kind, data.tfds_data_dir, **kwargs)
  if split not in b.info.splits:
    raise DataUnavailableError(f'offline dataset {b.info.full_name} has no split {split!r}; it '
                               f'has: {", ".join(b.info.splits)}')
  return b.as_data_source(split)


def open_source(spec: str, data):
  """The random-access source of one spec (see the module docstring)."""
  kind, argument = parse_spec(spec)
  if kind == 'synthetic':
    return synthetic.SyntheticImages(data.num_examples, size=2 * data.image_size,
                                     seed=data.shuffle_seed)
  if kind == 'folder':
    return FolderSource(argument)
  if kind == 'tfds':
    name, _, split = argument.partition(':')
    return open_tfds(name, split or data.tfds_split, data.tfds_data_dir)
  if kind == 'fashion_mnist':
    return open_offline(kind, argument or 'train', data)
  return open_offline(kind, 'train', data)
