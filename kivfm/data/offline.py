"""TFDS builder `kivfm_offline`: real images that ship inside registry packages (no network, no
TensorFlow; written as array_record for `tfds.data_source` and grain).

Configs:
  fashion_mnist  Fashion-MNIST (MIT, Zalando) from the Debian package `dataset-fashion-mnist`
                 (/usr/share/datasets/fashion-mnist): split 'train' (60,000, for distillation and
                 probes) and 'test' (10,000, held out); image uint8 [28, 28, 1], label 0-9
                 (`FASHION_MNIST_CLASSES`).
  photos         the real photographs shipped by scikit-image and scikit-learn (`PHOTOS`): split
                 'train'; image = PNG bytes (grey or RGB, any size), name = the loader's name.
A config made by `offline_config(kind, max_examples=N)` keeps only the first N examples of each
split and is stored under its own name (`fashion_mnist_first512`), never mixed with the full set.

Prepare (about 20 s for Fashion-MNIST, a few seconds for the photos; the pipeline also prepares
these on first use when `config.data.prepare_offline` is set):
  apt-get install -y dataset-fashion-mnist && pip install scikit-image scikit-learn
  python -m kivfm.data.offline --data_dir=~/tensorflow_datasets
Expected: `kivfm_offline/{fashion_mnist,photos}/1.0.0` under the data dir.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_PACKAGE = 'apt-get install -y dataset-fashion-mnist'
FASHION_MNIST_FILES = {  # split -> (images, labels), Debian file names
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
FASHION_MNIST_CLASSES = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                         'sneaker', 'bag', 'ankle boot')
# (package to install, module, loader names) of the photographs that load offline.
PHOTOS = (
    ('scikit-image', 'skimage.data', ('astronaut', 'brick', 'camera', 'cell', 'chelsea', 'clock',
                                      'coffee', 'coins', 'grass', 'gravel', 'hubble_deep_field',
                                      'immunohistochemistry', 'moon', 'retina', 'rocket')),
    ('scikit-learn', 'sklearn.datasets', ('china', 'flower')),
)
KINDS = ('fashion_mnist', 'photos')


class SourceMissingError(FileNotFoundError):
  """The files or packages an offline config is built from are not installed."""


@dataclasses.dataclass(eq=False)
class OfflineConfig(tfds.core.BuilderConfig):
  kind: str = 'fashion_mnist'     # one of KINDS
  max_examples: int = 0           # 0: all; else the first N of each split


def offline_config(kind: str, max_examples: int = 0) -> OfflineConfig:
  if kind not in KINDS:
    raise ValueError(f'unknown offline dataset {kind!r}; choose one of: {", ".join(KINDS)}')
  name = f'{kind}_first{max_examples}' if max_examples else kind
  return OfflineConfig(name=name, kind=kind, max_examples=max_examples,
                       description=f'{kind}' + (f', first {max_examples}' if max_examples else ''))


def _read_idx(path: str, magic: int, offset: int) -> np.ndarray:
  with gzip.open(path) as f:
    data = f.read()
  if len(data) < offset or int.from_bytes(data[:4], 'big') != magic:
    raise ValueError(f'{path} is not an idx file (magic {magic}); reinstall: '
                     f'{FASHION_MNIST_PACKAGE}')
  return np.frombuffer(data, np.uint8, offset=offset)


def read_fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of a split from the Debian files."""
  check_fashion_mnist(directory)
  images_file, labels_file = (os.path.join(directory, f) for f in FASHION_MNIST_FILES[split])
  images = _read_idx(images_file, 2051, 16).reshape(-1, 28, 28)
  labels = _read_idx(labels_file, 2049, 8)
  if len(images) != len(labels):
    raise ValueError(f'{images_file} has {len(images)} images but {labels_file} has '
                     f'{len(labels)} labels; reinstall: {FASHION_MNIST_PACKAGE}')
  return images, labels


def check_fashion_mnist(directory: str) -> None:
  missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair
             if not os.path.isfile(os.path.join(directory, f))]
  if missing:
    raise SourceMissingError(
        f'Fashion-MNIST files {missing} not found in {directory!r}; they come from the Debian '
        f'package dataset-fashion-mnist: {FASHION_MNIST_PACKAGE} (or set '
        f'config.data.fashion_mnist_dir to a directory holding them)')


def load_photos() -> list[tuple[str, np.ndarray]]:
  """(name, uint8 image) of every photograph in PHOTOS, in order."""
  import importlib
  out = []
  for package, module_name, names in PHOTOS:
    try:
      module = importlib.import_module(module_name)
    except ImportError as e:
      raise SourceMissingError(f'the offline photos need {module_name}, provided by the PyPI '
                               f'package {package}: pip install {package}') from e
    if module_name == 'sklearn.datasets':
      bunch = module.load_sample_images()
      found = {os.path.splitext(os.path.basename(f))[0]: im
               for f, im in zip(bunch.filenames, bunch.images)}
      out.extend((name, found[name]) for name in names)
    else:
      out.extend((name, getattr(module, name)()) for name in names)
  return out


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, 'PNG')
  return buffer.getvalue()


class KivfmOffline(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST and real photographs from installed packages; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [offline_config(kind) for kind in KINDS]
  # tfds looks for a checksums file beside a packaged builder's code through
  # `importlib_resources`, which it does not install; nothing is downloaded here.
  code_path = None

  def __init__(self, *, fashion_mnist_dir: str = FASHION_MNIST_DIR, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    self.fashion_mnist_dir = fashion_mnist_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.kind == 'fashion_mnist':
      features = {'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                  'label': tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES)}
    else:
      features = {'image': tfds.features.Tensor(shape=(), dtype=np.object_),
                  'name': tfds.features.Text()}
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    if self.builder_config.kind == 'fashion_mnist':
      check_fashion_mnist(self.fashion_mnist_dir)
      return {split: self._generate_examples(split) for split in FASHION_MNIST_FILES}
    return {'train': self._generate_examples('train')}

  def _limit(self, n: int) -> int:
    return min(n, self.builder_config.max_examples or n)

  def _generate_examples(self, split: str):
    if self.builder_config.kind == 'fashion_mnist':
      images, labels = read_fashion_mnist(self.fashion_mnist_dir, split)
      for i in range(self._limit(len(images))):
        yield i, {'image': images[i][..., None], 'label': int(labels[i])}
    else:
      photos = load_photos()
      for i, (name, image) in enumerate(photos[:self._limit(len(photos))]):
        yield i, {'image': _png(image), 'name': name}


def builder(kind: str, data_dir: str = '', *, max_examples: int = 0,
            fashion_mnist_dir: str = FASHION_MNIST_DIR) -> KivfmOffline:
  """The builder of one offline config in `data_dir` ('' = the TFDS default data dir).
  `max_examples` > 0 builds a subset config of its own (ignored for the 17 photos)."""
  max_examples = 0 if kind == 'photos' else max_examples
  config = offline_config(kind, max_examples)
  # tfds takes the declared configs by name only; subsets are custom configs of their own name.
  return KivfmOffline(config=config if max_examples else config.name,
                      data_dir=os.path.expanduser(data_dir) if data_dir else None,
                      fashion_mnist_dir=fashion_mnist_dir)


def prepare(kind: str, data_dir: str = '', **kwargs) -> KivfmOffline:
  """Prepares (once) and returns the builder; safe when several processes race on one dir."""
  b = builder(kind, data_dir, **kwargs)
  if b.is_prepared():
    return b
  logging.info('preparing the offline dataset %s in %s ...', b.info.full_name, b.data_dir)
  start = time.perf_counter()
  try:
    b.download_and_prepare()
  except SourceMissingError:
    raise
  except Exception:  # another process may have finished first
    b = builder(kind, data_dir, **kwargs)
    if not b.is_prepared():
      raise
  sizes = {name: split.num_examples for name, split in b.info.splits.items()}
  logging.info('prepared %s in %.1f s: %s examples, %.0f MB', b.info.full_name,
               time.perf_counter() - start, sizes, b.info.dataset_size / 1e6)
  return b


def command(kind: str, data_dir: str, max_examples: int = 0,
            fashion_mnist_dir: str = FASHION_MNIST_DIR) -> str:
  """The shell command that prepares one offline config."""
  parts = ['python -m kivfm.data.offline', f'--data_dir={data_dir or "~/tensorflow_datasets"}',
           f'--kinds={kind}']
  if max_examples and kind != 'photos':
    parts.append(f'--max_examples={max_examples}')
  if fashion_mnist_dir != FASHION_MNIST_DIR and kind == 'fashion_mnist':
    parts.append(f'--fashion_mnist_dir={fashion_mnist_dir}')
  return ' '.join(parts)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description='Prepares the kivfm_offline TFDS datasets.')
  parser.add_argument('--data_dir', default='', help='TFDS data dir ("": ~/tensorflow_datasets)')
  parser.add_argument('--kinds', default=','.join(KINDS), help='comma-separated configs')
  parser.add_argument('--max_examples', type=int, default=0, help='0: all examples')
  parser.add_argument('--fashion_mnist_dir', default=FASHION_MNIST_DIR)
  args = parser.parse_args(argv)
  for kind in args.kinds.split(','):
    b = prepare(kind, args.data_dir, max_examples=args.max_examples,
                fashion_mnist_dir=args.fashion_mnist_dir)
    print(f'{b.info.full_name}: {dict((k, v.num_examples) for k, v in b.info.splits.items())} '
          f'in {b.data_dir}')


if __name__ == '__main__':
  main()
