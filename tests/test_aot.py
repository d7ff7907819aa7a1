"""Ahead-of-time check (kivfm.aot) on the 8 fake CPU devices, and the abstract run it compiles."""
import jax
import pytest

from kivfm import aot, assembly, sharding
from kivfm import config as config_lib
from kivfm.errors import ConfigError
from kivfm.weights.errors import MissingWeightFileError

SMOKE = 'configs/base.py:smoke'


def test_memory_flops_verdict_and_hours(monkeypatch):
  config = config_lib.load(SMOKE)
  one = aot.analyze(config, '8xH100', batch_per_device=1, mfu=0.5)
  memory = one['memory_bytes']
  assert min(memory['arguments'], memory['outputs'], memory['temporaries']) > 0
  assert memory['total'] == (memory['arguments'] + memory['outputs'] + memory['temporaries'] -
                             memory['aliased'])
  assert one['global_batch'] == 8 and one['verdict'] == 'fits' and one['flops_per_image'] > 0
  # The compiled SPMD program counts per device: times the devices it is near the global count.
  assert 0.8 < one['compiled_flops_per_image'] / one['flops_per_image'] < 1.3
  chip = aot.TOPOLOGIES['8xH100']
  hours = (config.total_steps * 8 * one['flops_per_image'] /
           (8 * chip.peak_tflops * 1e12 * 0.5) / 3600)
  assert one['hours'] == pytest.approx(hours, rel=1e-9)

  # A chip with 1.5x the memory batch 1 needs does not hold batch 8.
  tiny = aot.Topology(devices=8, hbm_gib=1.5 * memory['total'] / aot.GIB, peak_tflops=1.0)
  monkeypatch.setitem(aot.TOPOLOGIES, 'tiny', tiny)
  eight = aot.analyze(config, 'tiny', batch_per_device=8)
  assert eight['global_batch'] == 64 and not eight['fits']
  assert eight['verdict'] == 'does not fit' and eight['headroom_gib'] < 0
  assert eight['flops_per_image'] == pytest.approx(one['flops_per_image'], rel=0.03)


def test_errors_name_the_topology():
  config = config_lib.load(SMOKE)
  with pytest.raises(ConfigError, match='topology v4-32 has 16 devices but this process sees 8'):
    aot.analyze(config, 'v4-32')
  with pytest.raises(ConfigError, match='known: v4-32, v5p-64'):
    aot.analyze(config, 'v9-1')
  config.data.batch_size = 12
  with pytest.raises(ConfigError, match='batch_size=12 does not divide over the 8 devices'):
    aot.analyze(config, '8xH100')


def test_abstract_run_allocates_and_reads_nothing():
  config = config_lib.load(SMOKE)
  mesh = sharding.make_mesh(config)
  leaves = lambda run: jax.tree.leaves((run.state, run.frozen, run.teacher_set.params))
  with jax.set_mesh(mesh):
    concrete = assembly.build_run(config, mesh)
    before = {id(x) for x in jax.live_arrays()}
    abstract = assembly.build_run(config, mesh, abstract=True)
    assert {id(x) for x in jax.live_arrays()} <= before
    # Missing teacher weights and normaliser statistics: an abstract run reads neither.
    config.teachers.dino.weights = '/nonexistent/dino.safetensors'
    config.unifier.normalizer = 'zscore'
    with pytest.raises(MissingWeightFileError):
      assembly.build_teachers(config, mesh)
    missing = assembly.build_run(config, mesh, '/nonexistent/stats', abstract=True)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves(abstract) + leaves(missing))
  assert [(x.shape, x.dtype, x.sharding) for x in leaves(abstract)] == [
      (x.shape, x.dtype, x.sharding) for x in leaves(concrete)]


def test_the_command_sets_up_the_topology_devices(tmp_path):
  """As a user runs it: 16 fake devices for v4-32 (the test session has 8), JSON written."""
  import json
  import subprocess
  import sys
  out = tmp_path / 'aot.json'
  result = subprocess.run([sys.executable, '-m', 'kivfm.aot', f'--config={SMOKE}',
                           '--topology=v4-32', '--batch_per_device=2', f'--out={out}'],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'v4-32: 16 devices, 32 GiB HBM' in result.stdout
  assert 'verdict: fits' in result.stdout
  assert json.loads(out.read_text())['global_batch'] == 32


def test_cached_teacher_targets_replace_the_teachers():
  """With config.teacher_cache the step reads stored targets: fewer FLOPs per image (no teacher
  forward passes), no teacher weights among the arguments."""
  online = aot.analyze(config_lib.load(SMOKE), '8xH100', batch_per_device=2)
  config = config_lib.load(SMOKE)
  config.teacher_cache = '/nonexistent/cache'      # never read: only shapes are needed
  cached = aot.analyze(config, '8xH100', batch_per_device=2)
  assert 0 < cached['flops_per_image'] < online['flops_per_image']
  assert cached['memory_bytes']['total'] > 0
  config.student.adapter_blocks = 1          # the stored trunk replaces the student's block 0
  config.cache.student_trunk = True
  trunk = aot.analyze(config, '8xH100', batch_per_device=2)
  assert 0 < trunk['flops_per_image'] < cached['flops_per_image']


def test_the_step_is_traced_as_the_accelerators_program(monkeypatch):
  """No XLA:CPU path (here the CPU attention kernel) in the program aot compiles, which the
  same step traced for this CPU has."""
  from kivfm.kernels import attention as cpu_attention
  if not (jax.default_backend() == 'cpu' and cpu_attention.available()):
    pytest.skip('needs the CPU attention kernel')
  texts = []
  lower = aot.lower_step
  monkeypatch.setattr(aot, 'lower_step', lambda *a: texts.append(lower(*a).as_text()) or lower(*a))
  aot.analyze(config_lib.load(SMOKE), '8xH100', batch_per_device=1)
  kernel = ('kivfm_attention', 'CustomSPMDPartitioning')   # a call, or one split over the mesh
  assert texts and not any(name in text for text in texts for name in kernel)
  config = config_lib.load(SMOKE)
  mesh = sharding.make_mesh(config)
  images = jax.ShapeDtypeStruct((8, 32, 32, 3), jax.numpy.uint8,
                                sharding=sharding.batch_sharding(mesh, config.sharding.rules, 4))
  with jax.set_mesh(mesh):
    assert 'CustomSPMDPartitioning' in lower(config, mesh, images).as_text()
