"""Fused softmax attention for XLA:CPU (`attention_cpu.cc`, an XLA FFI custom call).

XLA:CPU runs attention's small batched matmuls (a [N, Dh] x [Dh, N] per batch and head) at
under half the speed of a plain GEMM, and adds transposes, a softmax and its reductions around
them. The kernel reads q, k, v [B, N, H, Dh] in place and runs each (batch, head) pair with
Eigen's GEMMs on XLA's intra-op threads; its backward recomputes the probabilities from the
saved log-sum-exp. The shared library is compiled on first use (g++, Eigen headers, jaxlib's
FFI headers) into $KIVFM_CACHE/kernels/<hash of source, compiler, jaxlib, CPU>/; without a
compiler or Eigen, `available()` is False, kivfm keeps XLA's attention and says once how to
install them. KIVFM_CPU_ATTENTION=0 turns the kernel off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from kivfm import backend
from kivfm.weights import sources

SOURCE = os.path.join(os.path.dirname(__file__), 'attention_cpu.cc')
SWITCH = 'KIVFM_CPU_ATTENTION'   # '0': XLA's attention on CPU
EIGEN_DIRS = ('/usr/include/eigen3', '/usr/local/include/eigen3')
INSTALL_HINT = 'apt-get install g++ libeigen3-dev'
TARGETS = {'kivfm_attention_forward': 'KivfmAttentionForward',
           'kivfm_attention_backward': 'KivfmAttentionBackward'}


def eigen_dir() -> str | None:
  """The Eigen include directory ($EIGEN_INCLUDE_DIR or a system one), or None."""
  candidates = (os.environ.get('EIGEN_INCLUDE_DIR', ''),) + EIGEN_DIRS
  return next((d for d in candidates if d and os.path.isfile(os.path.join(d, 'Eigen', 'Core'))),
              None)


def _cpu_signature() -> str:
  """What `-march=native` compiles for: the CPU's model and flags (a cache shared between
  different machines keeps one build per CPU)."""
  try:
    with open('/proc/cpuinfo') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor()


def library_path(compiler: str) -> str:
  """Where the build of this source, compiler, jaxlib and CPU lives."""
  version = subprocess.run([compiler, '--version'], capture_output=True, text=True).stdout
  with open(SOURCE, 'rb') as f:
    key = hashlib.sha256(f.read() + version.encode() + jax.__version__.encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
  return os.path.join(sources.cache_dir(), 'kernels', key, 'attention_cpu.so')


def build(compiler: str, eigen: str) -> str:
  """Compiles the kernel unless built already; returns the library's path. Writes to a
  temporary file and renames it, so processes building at once never see half a library."""
  target = library_path(compiler)
  if os.path.isfile(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(target))
  os.close(fd)
  command = [compiler, '-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-DNDEBUG',
             '-DEIGEN_DONT_PARALLELIZE', f'-I{jax.ffi.include_dir()}', f'-I{eigen}', SOURCE,
             '-o', tmp]
  try:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f'building {SOURCE} failed ({" ".join(command)}):\n{result.stderr}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


@functools.cache
def available() -> bool:
  """True once the kernel is built, loaded and registered with XLA:CPU; False (with a note
  on stderr) when it cannot be, or with KIVFM_CPU_ATTENTION=0."""
  if os.environ.get(SWITCH) == '0' or not sys.platform.startswith('linux'):
    return False
  compiler, eigen = shutil.which(os.environ.get('CXX', 'g++')), eigen_dir()
  if compiler is None or eigen is None:
    print(f'kivfm: no C++ compiler or Eigen headers; `{INSTALL_HINT}` gives XLA:CPU a fused '
          f'attention kernel, up to 1.3x faster steps ({SWITCH}=0 hides this note).',
          file=sys.stderr)
    return False
  library = ctypes.cdll.LoadLibrary(build(compiler, eigen))
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return True


def supported(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether `attention` serves these operands here, in float32: float32 or half-precision
  operands on the CPU backend, outside `backend.as_accelerator` (where XLA's attention runs,
  whose FLOPs XLA's cost analysis counts, unlike a custom call's)."""
  return (backend.cpu_paths() and q.ndim == 4
          and all(x.dtype in (jnp.float32, jnp.bfloat16, jnp.float16) for x in (q, k, v))
          and available())


def _batch_and_heads(mesh, sharding, ndim: int):
  """`sharding` kept on the batch (0) and heads (2) dimensions of a [B, N, H, Dh] array, with
  the token and feature dimensions whole: a shard is a set of whole (batch, head) pairs."""
  spec = tuple(getattr(sharding, 'spec', ())) + (None,) * 4
  return NamedSharding(mesh, P(spec[0], None, spec[2], None) if ndim == 4 else
                       P(spec[0], spec[2], None))


def _partitioned(ffi_target: str, out_shapes, rule: str):
  """The FFI call `ffi_target`; under a mesh of several devices, as an op the SPMD partitioner
  splits by (batch, head) pairs (without that, XLA gathers every shard onto every device and
  repeats the whole call there). On one device it stays a plain call: a custom partitioning
  puts a Python object's address into the program, so JAX's persistent compilation cache
  would miss in every new process."""
  def call(*args):
    return jax.ffi.ffi_call(ffi_target, out_shapes(*args))(*args)

  def partition(mesh, arg_shapes, result_shape):
    q_sharding = arg_shapes[0].sharding
    args = tuple(_batch_and_heads(mesh, q_sharding, len(a.shape)) for a in arg_shapes)
    results = tuple(_batch_and_heads(mesh, q_sharding, len(r.shape)) for r in result_shape)
    return mesh, call, results, args

  def infer(mesh, arg_shapes, result_shape):
    return tuple(_batch_and_heads(mesh, arg_shapes[0].sharding, len(r.shape))
                 for r in result_shape)

  split = custom_partitioning(call)
  split.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                      need_replication_factors=('q', 'd', 'k'))   # in order of appearance
  return lambda *args: (split if jax.sharding.get_abstract_mesh().size > 1 else call)(*args)


_forward_op = _partitioned(
    'kivfm_attention_forward',
    lambda q, k, v: (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                     jax.ShapeDtypeStruct((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)),
    'b q h d, b k h d, b k h d -> b q h d, b h q')
_backward_op = _partitioned(
    'kivfm_attention_backward',
    lambda q, k, v, out, lse, g: tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                                       for x in (q, k, v)),
    'b q h d, b k h d, b k h d, b q h d, b h q, b q h d -> b q h d, b k h d, b k h d')


def _forward_call(q, k, v):
  if not available():
    raise RuntimeError(f'the CPU attention kernel is unavailable (see `available`; {SWITCH})')
  return _forward_op(q, k, v)


@jax.custom_vjp
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v per batch and head: q [B, Nq, H, Dh], k and v [B, Nk, H, Dh]
  (float32) -> [B, Nq, H, Dh]. Call it where `supported` holds."""
  return _forward_call(q, k, v)[0]


def _attention_fwd(q, k, v):
  out, lse = _forward_call(q, k, v)
  return out, (q, k, v, out, lse)


def _attention_bwd(residuals, g):
  return tuple(_backward_op(*residuals, g))


attention.defvjp(_attention_fwd, _attention_bwd)
