"""The trainable model of knowledge inheritance: student + latent unifier."""
from __future__ import annotations

import jax
from flax import nnx

from kivfm.models.student import Student
from kivfm.models.unifier import Unifier


class KPU(nnx.Module):
  """The student (f(I) = {x, V}) and the unifier (per-teacher heads and the shared space).

  Called on a batch and the teachers' outputs on it, it returns everything the objective
  (`kivfm.losses.objective`) compares; used for prediction through `kivfm.inference`.
  """

  def __init__(self, student: Student, unifier: Unifier):
    self.student = student
    self.unifier = unifier

  def __call__(self, images: jax.Array, targets: dict) -> dict:
    """{'student': f(I), 'predictions': alias -> s2t prediction (normalised space),
    'in_teacher_space': alias -> that prediction de-normalised, 'normalized': alias -> N_t(g_t),
    'shared': alias -> shared-space codes (empty without a shared space)}; every value a
    {'cls', 'patches'} pair (the shared codes one per role)."""
    return self.unify(self.student(images), targets)

  def unify(self, student: dict, targets: dict) -> dict:
    """`__call__` from the student's features f(I) = {'cls', 'patches'} on."""
    predictions = self.unifier(student)
    normalized = self.unifier.normalize(targets)
    return {
        'student': student,
        'predictions': predictions,
        'in_teacher_space': {alias: self.unifier.to_teacher_space(alias, p)
                             for alias, p in predictions.items()},
        'normalized': normalized,
        'shared': self.unifier.shared(student, normalized) if self.unifier.shared_dim else {},
    }
