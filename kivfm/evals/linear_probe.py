"""Linear probe: multinomial logistic regression on frozen, standardised features.

Objective: mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is not decayed), minimised
full-batch by L-BFGS (`optax.lbfgs`, zoom line search) for a fixed number of steps from zero
weights, inside one jitted loop. The problem is convex (strictly so for weight_decay > 0), so the
result does not depend on initialisation and the run is deterministic.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def standardize(train_feats, *others):
  """(train - mean) / std for train and each of `others`, statistics from train only (float64).

  Constant channels (std < 1e-12 * max(1, |mean|)) get std 1, i.e. they become 0.
  """
  train = np.asarray(train_feats, np.float64)
  mean = train.mean(axis=0)
  std = train.std(axis=0)
  std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
  return tuple(((np.asarray(x, np.float64) - mean) / std).astype(np.float32)
               for x in (train, *others))


def _loss(params, x, y, weight_decay):
  logits = jnp.matmul(x, params['w'], precision=jax.lax.Precision.HIGHEST) + params['b']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return ce + 0.5 * weight_decay * jnp.sum(params['w'] ** 2)


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps', 'lr'))
def _fit(x, y, weight_decay, *, num_classes, steps, lr):
  params = {'w': jnp.zeros((x.shape[1], num_classes), jnp.float32),
            'b': jnp.zeros((num_classes,), jnp.float32)}
  value_fn = functools.partial(_loss, x=x, y=y, weight_decay=weight_decay)
  solver = optax.lbfgs(learning_rate=lr)
  value_and_grad = optax.value_and_grad_from_state(value_fn)

  def step(_, carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, solver.init(params)))
  return params, value_fn(params)


def fit_linear_probe(train_feats, train_labels, *, steps: int = 100, lr: float | None = None,
                     weight_decay: float = 1e-4, num_classes: int | None = None):
  """Fits on standardised train rows [N, D] with labels [N]; returns (params, final loss)."""
  labels = np.asarray(train_labels)
  if labels.ndim != 1 or len(labels) != np.shape(train_feats)[0] or labels.min() < 0:
    raise ValueError('train_labels must be [N] non-negative class ids, N = len(train_feats)')
  num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
  params, loss = _fit(jnp.asarray(train_feats, jnp.float32), jnp.asarray(labels, jnp.int32),
                      jnp.float32(weight_decay), num_classes=num_classes, steps=int(steps),
                      lr=lr)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f'linear probe diverged (loss {float(loss)}); raise weight_decay')
  return params, float(loss)


def linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels, *,
                          steps: int = 100, lr: float | None = None, weight_decay: float = 1e-4,
                          seed: int = 0, num_classes: int | None = None,
                          return_predictions: bool = False):
  """Test top-1 accuracy of a logistic-regression probe trained on (train_feats, train_labels).

  lr: L-BFGS learning rate; None lets the line search choose the step (recommended).
  seed: unused (convex problem, zero initialisation); accepted so callers can pass one uniformly.
  With `return_predictions`, returns (accuracy, predictions [M]).
  """
  del seed
  train, test = standardize(train_feats, test_feats)
  params, _ = fit_linear_probe(train, train_labels, steps=steps, lr=lr,
                               weight_decay=weight_decay, num_classes=num_classes)
  logits = np.asarray(test, np.float64) @ np.asarray(params['w'], np.float64) + np.asarray(
      params['b'], np.float64)
  preds = np.argmax(logits, axis=-1)
  test_labels = np.asarray(test_labels)
  if test_labels.shape != preds.shape:
    raise ValueError(f'test_labels shape {test_labels.shape} != predictions {preds.shape}')
  accuracy = float(np.mean(preds == test_labels)) if len(preds) else float('nan')
  return (accuracy, preds) if return_predictions else accuracy
