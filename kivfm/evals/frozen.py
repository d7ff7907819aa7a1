"""What the frozen-feature evaluators ('classification', 'semantic_segmentation', 'detection')
share: train / test data read once, and a model's standardised patch features."""
from __future__ import annotations

import numpy as np

from kivfm.evals.linear_probe import standardize
from kivfm.evals.report import batched


class TrainTest:
  """Reads `options.train` and `options.test` once, at `options.image_size` (0: the view size),
  with `_read(spec, limit, size, data)`, which each subclass defines; nothing to do before
  training."""

  def __init__(self, options, config):
    self.options = options
    size = options.image_size or config.data.image_size
    self.train = self._read(options.train, options.max_train, size, config.data)
    self.test = self._read(options.test, options.max_test, size, config.data)

  def start(self, model) -> None:
    del model


def standardized_patches(model, train_images: np.ndarray, test_images: np.ndarray,
                         batch: int) -> tuple[np.ndarray, np.ndarray]:
  """`model.features(...)['patches']` [N, h, w, D] of both image sets, each channel
  standardised with the train images' statistics."""
  patches = lambda x: batched(lambda b: model.features(b)['patches'], x, batch)
  train, test = patches(train_images), patches(test_images)
  flat_train, flat_test = standardize(train.reshape(-1, train.shape[-1]),
                                      test.reshape(-1, test.shape[-1]))
  return flat_train.reshape(train.shape), flat_test.reshape(test.shape)
