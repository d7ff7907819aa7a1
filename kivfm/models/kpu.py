"""The trainable model of knowledge inheritance: student + latent unifier."""
from __future__ import annotations

from flax import nnx

from kivfm.models.student import Student
from kivfm.models.unifier import Unifier


class KPU(nnx.Module):
  """The student (f(I) = {x, V}) and the unifier (per-teacher heads and the shared space).

  Trained through `kivfm.losses.objective`; used through `kivfm.inference`.
  """

  def __init__(self, student: Student, unifier: Unifier):
    self.student = student
    self.unifier = unifier
