"""Frozen-feature classification (evaluator 'classification'), the DINO / DINOv2 protocols on any
labelled source:
  * kNN: cosine similarity of global features, each of the k nearest training images votes
    exp(sim / T) for its class (DINO), at every k of `ks`;
  * linear probe: logistic regression on [global, mean patch] features, standardised with train
    statistics; its L2 weight decay (the probe is solved by L-BFGS with a line search, so the
    regularisation, not a learning rate, is the hyperparameter) is chosen on a held-out part of
    train, then the probe is refit on all of train and scored on test.
Images: the first `max_train` / `max_test` good examples of each source spec (`fashion_mnist:SPLIT`,
`tfds:NAME:SPLIT`, `folder:PATH`, as in `config.data.mixture`), centre square, resized to
`image_size` (0: the run's `data.image_size`). Bad records are skipped and counted.
"""
from __future__ import annotations

import logging

import numpy as np

from kivfm.data import examples, images, sources
from kivfm.evals import knn, linear_probe
from kivfm.evals.frozen import TrainTest
from kivfm.evals.report import batched


def labelled_images(spec: str, data, limit: int, size: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(uint8 [N, size, size, 3], int labels [N], bad records skipped) of the first `limit` good
  labelled examples of source `spec` (0: all)."""
  source = examples.Examples(sources.open_source(spec, data), name=spec)
  pixels, labels, bad = [], [], 0
  for index in range(len(source)):
    if limit and len(labels) == limit:
      break
    example = source[index]
    if examples.is_bad(example) or example['label'] < 0:
      bad += 1
      continue
    pixels.append(images.center_square(example['image'], size))
    labels.append(int(example['label']))
  if not labels:
    raise sources.DataUnavailableError(f'source {spec!r} has no good labelled example')
  return np.stack(pixels), np.asarray(labels, np.int32), bad


def features(model, pixels: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """(global [N, D], [global, mean patch] [N, 2D]) of `model.features` over `pixels`."""
  out = batched(model.features, pixels, batch)
  return out['cls'], np.concatenate([out['cls'], out['patches'].mean(axis=(1, 2))], axis=-1)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit, held-out) indices: a seeded random `fraction` of train held out (at least one)."""
  order = np.random.default_rng(seed).permutation(len(labels))
  held = max(1, int(round(fraction * len(labels))))
  return np.sort(order[held:]), np.sort(order[:held])


def probe(train, train_y, test, test_y, options) -> dict:
  """Linear-probe test accuracy with the weight decay chosen on held-out train rows."""
  fit, held = holdout_split(train_y, options.holdout, options.seed)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  sweep = {}
  for wd in options.weight_decays:
    sweep[f'{wd:g}'] = linear_probe.linear_probe_accuracy(
        train[fit], train_y[fit], train[held], train_y[held], steps=options.probe_steps,
        weight_decay=wd, num_classes=num_classes)
  best = max(options.weight_decays, key=lambda wd: sweep[f'{wd:g}'])   # first of equals
  accuracy = linear_probe.linear_probe_accuracy(train, train_y, test, test_y,
                                                steps=options.probe_steps, weight_decay=best,
                                                num_classes=num_classes)
  return {'accuracy': accuracy, 'weight_decay': best, 'held_out_accuracy': sweep}


class Classification(TrainTest):
  """kNN and linear-probe accuracy of a model's frozen features (see the module docstring)."""

  DEFAULTS = dict(
      train='fashion_mnist:train',    # source spec of the training images
      test='fashion_mnist:test',      # source spec of the test images
      max_train=2000,                 # first N good examples (0: all)
      max_test=1000,
      image_size=0,                   # side of the centre square fed to the model (0: view size)
      ks=(10, 20),
      temperature=0.07,
      weight_decays=(1e-4, 1e-3, 1e-2, 1e-1),
      holdout=0.2,                    # fraction of train that selects the weight decay
      probe_steps=100,                # L-BFGS iterations
      seed=0,
      batch_size=64,
  )

  def _read(self, spec, limit, size, data):
    pixels, labels, bad = labelled_images(spec, data, limit, size)
    if bad:
      logging.warning('classification: skipped %d bad records of %s', bad, spec)
    return pixels, labels, bad

  def evaluate(self, model) -> dict:
    o = self.options
    (train_x, train_y, train_bad), (test_x, test_y, test_bad) = self.train, self.test
    train_global, train_probe = features(model, train_x, o.batch_size)
    test_global, test_probe = features(model, test_x, o.batch_size)
    return {
        'images': {'train': len(train_y), 'test': len(test_y), 'size': int(train_x.shape[1]),
                   'skipped': {'train': train_bad, 'test': test_bad}},
        'knn': {f'k{k}': knn.knn_accuracy(train_global, train_y, test_global, test_y, k=k,
                                          temperature=o.temperature) for k in o.ks},
        'linear': probe(train_probe, train_y, test_probe, test_y, o),
    }

  def write(self, results: dict, workdir: str) -> None:
    del workdir
    print(table(results), flush=True)


def table(results: dict) -> str:
  images = results['images']
  rows = [f'classification ({images["train"]} train / {images["test"]} test images at '
          f'{images["size"]} px)']
  rows += [f'  kNN {k}: {accuracy:.4f}' for k, accuracy in results['knn'].items()]
  linear = results['linear']
  rows.append(f'  linear probe: {linear["accuracy"]:.4f} (weight decay {linear["weight_decay"]:g}, '
              f'chosen on held-out train)')
  return '\n'.join(rows)
