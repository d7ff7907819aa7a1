"""The optimizer: AdamW with warm-up + cosine, clipping, a decay mask and per-group learning
rates over the trainable parameters (`config.optim.groups`; unmatched parameters are frozen)."""
from __future__ import annotations

import re

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kivfm.errors import ConfigError
from kivfm.weights.readers import path_str


def param_groups(config, abstract_state: nnx.State) -> dict:
  """path -> lr multiplier of every trainable parameter (first matching group wins)."""
  groups = [(re.compile(rx), float(mult)) for rx, mult in config.optim.groups]
  matched, used = {}, set()
  for path, variable in nnx.to_flat_state(abstract_state):
    if not isinstance(variable, nnx.Param):
      continue  # statistics and other state are never trained
    name = path_str(path)
    for rx, mult in groups:
      if rx.fullmatch(name):
        matched[name] = mult
        used.add(rx.pattern)
        break
  for rx, _ in groups:
    if rx.pattern not in used:
      raise ConfigError(
          f'config.optim.groups: pattern {rx.pattern!r} matches no parameter '
          f'(parameters look like {path_str(nnx.to_flat_state(abstract_state)[0][0])!r})')
  return matched


def make_schedule(config) -> optax.Schedule:
  o = config.optim
  warmup = min(o.warmup_steps, config.total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=o.lr * o.end_lr_fraction)


def make_optimizer(config, params: dict, multipliers: dict) -> optax.GradientTransformation:
  """`params`: pure dict of trainable parameters; `multipliers`: path -> lr multiplier."""
  o = config.optim
  no_decay = re.compile(o.no_decay)
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and not no_decay.fullmatch(path_str(path)), params)
  lr_scale = jax.tree_util.tree_map_with_path(
      lambda path, p: multipliers[path_str(path)], params)
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []
  parts.append(optax.adamw(make_schedule(config), b1=o.b1, b2=o.b2,
                           weight_decay=o.weight_decay, mask=decay_mask))
  if any(m != 1.0 for m in multipliers.values()):
    parts.append(optax.stateless(
        lambda updates, _: jax.tree.map(lambda u, m: u * m, updates, lr_scale)))
  return optax.chain(*parts)


def opt_state_shardings(tx, abstract_params: dict, param_shardings: dict, mesh):
  """Moments sharded like their parameters; counters replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  return optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated)
