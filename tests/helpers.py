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


def perturb(model, seed: int):
  """A torch reference model in eval mode with noise on every parameter, so zero / one
  initialisations (biases, LayerScale, norms, relative positions) cannot hide a wrong mapping."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def torch_images(batch: int, size: tuple[int, int], seed: int):
  """Seeded standard-normal NCHW torch images."""
  import torch
  return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
