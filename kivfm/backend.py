"""Which backend a program is traced for: XLA:CPU gets its own fast paths (the fused attention
kernel, float32-result half-precision products, depthwise convolutions as shifted slices, the
gradient barrier's conditional, the attention normaliser from the value matmul), other backends
the plain formulations. `kivfm.aot` compiles a TPU / GPU step on CPU, so it traces the step as
that accelerator's program (`as_accelerator`), and so do FLOP counts: XLA's cost analysis counts
nothing inside the CPU attention kernel's custom call."""
from __future__ import annotations

import contextlib

import jax

_as_accelerator = 0


@contextlib.contextmanager
def as_accelerator():
  """Programs traced inside (by a fresh jit: traces are cached) leave out the XLA:CPU paths."""
  global _as_accelerator
  _as_accelerator += 1
  try:
    yield
  finally:
    _as_accelerator -= 1


def cpu_paths() -> bool:
  """Whether to trace the XLA:CPU paths: on the CPU backend, outside `as_accelerator`."""
  return not _as_accelerator and jax.default_backend() == 'cpu'
