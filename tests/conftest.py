"""Test set-up, before jax is imported anywhere: 8 fake CPU devices, and every cache pointed at a
fresh folder of this session, so no test leans on what an earlier run (or a user) left behind."""
import atexit
import os
import shutil
import sys
import tempfile

# 8 devices; tiny models compile far longer than they run, so XLA:CPU skips its expensive
# backend optimisations here (same programs, same semantics; ~2x faster compiles).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0'
                           ' --xla_llvm_disable_expensive_passes=true').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

SCRATCH = tempfile.mkdtemp(prefix='kivfm-tests-')
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
# Variable -> folder: kivfm's converted weights, TFDS data, Hugging Face hub, matplotlib, XDG
# caches, and JAX's compilation cache (shared by this session's subprocesses, so the resume
# tests' identical programs compile once).
CACHES = {'KIVFM_CACHE': 'kivfm', 'TFDS_DATA_DIR': 'tensorflow_datasets', 'HF_HOME': 'huggingface',
          'MPLCONFIGDIR': 'matplotlib', 'XDG_CACHE_HOME': 'cache',
          'JAX_COMPILATION_CACHE_DIR': 'jax'}
for variable, folder in CACHES.items():
  os.environ[variable] = os.path.join(SCRATCH, folder)
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture
def fast_tracing(monkeypatch):
  """Speed only. Each RNG draw in a module constructor makes flax probe `.sharding` on a tracer;
  jax answers with an AttributeError whose message scans the whole trace so far, so building a
  ViT-g abstractly costs ~10 s (quadratic in the parameter count). The message is never shown
  by the tests that use this, so skip building it (~5x faster)."""
  from jax._src.interpreters import partial_eval
  monkeypatch.setattr(partial_eval.DynamicJaxprTracer, '_origin_msg', lambda self: '',
                      raising=False)
