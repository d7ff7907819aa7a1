"""Using a trained student: general features, and the student standing in for each teacher.

  student = kivfm.inference.load('runs/demo')          # config.json + latest checkpoint, or
                                                       # a `kivfm.export` folder
  feats = student.features(images)                     # {'cls': [B, D], 'patches': [B, h, w, D]}
  feats = student.features(images, size='input')      # at the images' own size (any, non-square
                                                       # too; position embeddings interpolated)
  out = student.as_teacher('effnet')(images)           # EfficientNet-space 'cls'/'patches' and
                                                       # the teacher's own head: out['logits']
  out = student.predict(images)                        # features and every as_teacher, one pass
Images are uint8 NHWC; `features` resizes them to the training view size
(`config.data.image_size`) unless given `size`, `as_teacher` always does.
"""
from __future__ import annotations

import functools
import json

import jax
from flax import nnx

from kivfm import (assembly, checkpointing, config as config_lib, exported, paths, sharding,
                   teachers)


# Module-level jitted functions: every Inherited of the same structure (e.g. a student
# evaluated every N steps) reuses their compiled programs.
@functools.partial(nnx.jit, static_argnames='size')
def _features(model, images, size=None):
  return model.student(images, size)


@nnx.jit
def _run_teacher(teacher, images):
  return teacher(images)


@functools.partial(nnx.jit, static_argnames='alias')
def _as_teacher(model, teacher, images, alias: str):
  predicted = model.unifier(model.student(images))[alias]
  out = model.unifier.to_teacher_space(alias, predicted)
  return {**out, **teacher.native_heads(out)}


@nnx.jit
def _predict(model, teachers, images):
  features = model.student(images)
  out = {'features': features}
  for alias, predicted in model.unifier(features).items():
    predicted = model.unifier.to_teacher_space(alias, predicted)
    out[alias] = {**predicted, **teachers[alias].native_heads(predicted)}
  return out


class Inherited:
  """A student with its unifier and the teachers' heads."""

  def __init__(self, model, teachers: dict, step: int | None = None):
    self.model, self.teachers, self.step = model, teachers, step   # step: of its checkpoint

  def features(self, images, size: str | tuple[int, int] | None = None) -> dict:
    """Student features at the training size, at `size` (h, w) or, with size='input', at the
    images' own size; sizes are rounded to the nearest multiple of the patch size."""
    if size is None:
      return _features(self.model, images)
    if size == 'input':
      size = images.shape[1:3]
    p = self.model.student.vit.cfg.patch_size
    return _features(self.model, images, tuple(max(p, round(s / p) * p) for s in size))

  def predict(self, images) -> dict:
    """{'features': `features(images)`, alias: `as_teacher(alias)(images)` for every teacher},
    from one pass of the student."""
    return _predict(self.model, self.teachers, images)

  def teacher(self, alias: str):
    """images -> what teacher `alias` itself outputs (jitted)."""
    if isinstance(self.teachers[alias], teachers.NativeHeads):
      raise ValueError(f'an exported student holds only the heads of teacher {alias!r}; load '
                       f'the teacher itself with kivfm.teachers.load')
    return lambda images: _run_teacher(self.teachers[alias], images)

  def as_teacher(self, alias: str):
    """images -> the student's prediction of teacher `alias`'s outputs, in that teacher's own
    space, plus what the teacher's native head makes of it."""
    if alias not in self.teachers:
      raise KeyError(f'no teacher {alias!r}; this student knows {", ".join(sorted(self.teachers))}')
    return lambda images: _as_teacher(self.model, self.teachers[alias], images, alias=alias)


class TeacherModel:
  """A teacher on its own with a student's `features`, `teachers` and `teacher(alias)`
  (baselines of the evaluators)."""

  def __init__(self, name: str, teacher):
    self.teachers = {name: teacher}

  def features(self, images) -> dict:
    (teacher,) = self.teachers.values()
    return _run_teacher(teacher, images)

  def teacher(self, alias: str):
    return lambda images: _run_teacher(self.teachers[alias], images)


def from_run(run: assembly.Run, state: assembly.TrainState) -> Inherited:
  model = run.kpu(state)
  teachers = {alias: nnx.merge(graphdef, nnx.State(run.teacher_set.params[alias]))
              for alias, graphdef in run.teacher_set.graphdefs.items()}
  return Inherited(model, teachers, int(jax.device_get(state.step)))


def load(workdir: str, step: int | None = None) -> Inherited:
  """The student trained in `workdir` (its config.json and checkpoint `step`, default latest);
  teachers are rebuilt from their own weight sources. An export folder (`kivfm.export`) loads
  with the teachers' native heads only, no teacher network."""
  if exported.is_export(workdir):
    if step is not None:
      raise ValueError(f'{workdir} is an export of one step; --step={step} does not apply')
    return Inherited(*exported.read(workdir))
  config = config_lib.from_dict(json.loads((paths.path(workdir) / 'config.json').read_text()))
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    run = assembly.build_run(config, mesh)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints,
                                      every=config.checkpoint_every)
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt.directory}')
    state = ckpt.restore(step, assembly.abstract_like(run.state, run.state_shardings))
    ckpt.close()
  return from_run(run, state)
