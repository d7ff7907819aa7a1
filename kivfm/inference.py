"""Using a trained student: general features, and the student standing in for each teacher.

  student = kivfm.inference.load('runs/demo')          # config.json + latest checkpoint
  feats = student.features(images)                     # {'cls': [B, D], 'patches': [B, h, w, D]}
  out = student.as_teacher('effnet')(images)           # EfficientNet-space 'cls'/'patches' and
                                                       # the teacher's own head: out['logits']
Images are uint8 NHWC at the training view size (`config.data.image_size`).
"""
from __future__ import annotations

import json
import os

import jax
from flax import nnx

from kivfm import checkpointing, config as config_lib, sharding, train


class Inherited:
  """A student with its unifier and the teachers' heads."""

  def __init__(self, model, teachers: dict):
    self.model, self.teachers = model, teachers
    self._features = nnx.jit(lambda m, x: m.student(x))
    self._run_teacher = nnx.jit(lambda t, x: t(x))
    self._as_teacher = {}

  def features(self, images) -> dict:
    return self._features(self.model, images)

  def teacher(self, alias: str):
    """images -> what teacher `alias` itself outputs (jitted)."""
    return lambda images: self._run_teacher(self.teachers[alias], images)

  def as_teacher(self, alias: str):
    """images -> the student's prediction of teacher `alias`'s outputs, in that teacher's own
    space, plus what the teacher's native head makes of it."""
    if alias not in self.teachers:
      raise KeyError(f'no teacher {alias!r}; this student knows {", ".join(sorted(self.teachers))}')
    if alias not in self._as_teacher:
      def predict(model, teacher, images):
        predicted = model.unifier(model.student(images))[alias]
        out = model.unifier.to_teacher_space(alias, predicted)
        return {**out, **teacher.native_heads(out)}
      jitted = nnx.jit(predict)
      self._as_teacher[alias] = lambda images: jitted(self.model, self.teachers[alias], images)
    return self._as_teacher[alias]


def from_run(run: train.Run, state: train.TrainState) -> Inherited:
  model = nnx.merge(run.kpu_graphdef, nnx.State(state.params), nnx.State(state.stats),
                    nnx.State(run.frozen))
  teachers = {alias: nnx.merge(graphdef, nnx.State(run.teacher_set.params[alias]))
              for alias, graphdef in run.teacher_set.graphdefs.items()}
  return Inherited(model, teachers)


def load(workdir: str, step: int | None = None) -> Inherited:
  """The student trained in `workdir` (its config.json and checkpoint `step`, default latest);
  teachers are rebuilt from their own weight sources."""
  with open(os.path.join(workdir, 'config.json')) as f:
    config = config_lib.from_dict(json.load(f))
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = train.build_run(config, mesh)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                      every=config.checkpoint_every)
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt.directory}')
    state = ckpt.restore(step, train.abstract_like(run.state, run.state_shardings))
    ckpt.close()
  return from_run(run, state)
