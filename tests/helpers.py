"""Helpers shared by tests (kept out of the package: nothing in kivfm needs them)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from kivfm import assembly, teachers, train


@dataclasses.dataclass
class TrainableRun(assembly.Run):
  step_fn: Any = None             # train.jit_train_step(config, run)


def build_run(config, mesh, stats_dir: str = '') -> TrainableRun:
  """The assembled run with its jitted train step, as the tests drive it."""
  run = assembly.build_run(config, mesh, stats_dir)
  fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(run)}
  return TrainableRun(**fields, step_fn=train.jit_train_step(config, run))


def ported(make_model: Callable[[], nnx.Module], pure: dict, dtype=None) -> nnx.Module:
  """The module `make_model` builds, holding converted weights `pure`, without a random init."""
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
  return nnx.merge(graphdef, nnx.State(teachers.place(pure, abstract, 'converted weights')))


def flat(tree) -> dict:
  """path string -> leaf of a pytree of parameters."""
  from kivfm.weights.readers import path_str
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
