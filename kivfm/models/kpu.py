"""The trainable model of knowledge inheritance: student + latent unifier."""
from __future__ import annotations

import jax
from flax import nnx

from kivfm.models.student import Student
from kivfm.models.unifier import Unifier


class KPU(nnx.Module):
  """images -> {'student': {x, V}, 'pred': {alias: student's prediction of teacher outputs}}."""

  def __init__(self, student: Student, unifier: Unifier):
    self.student = student
    self.unifier = unifier

  def __call__(self, images: jax.Array) -> dict:
    feats = self.student(images)
    return {'student': feats, 'pred': self.unifier(feats)}
