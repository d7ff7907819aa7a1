"""Parameters, optimizer state and batches are sharded as the rules say; results match 1 device."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import helpers
from helpers import build_run
from kivfm import assembly, config as config_lib, sharding
from kivfm.models import layers


def smoke(mesh_shape):
  config = config_lib.load('configs/base.py:smoke')
  config.mesh.shape = mesh_shape
  config.unifier.hidden = 64
  return config


def build(config, devices=None):
  mesh = sharding.make_mesh(config, devices)
  with jax.set_mesh(mesh):
    return build_run(config, mesh)


def images(n=8, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def flat(tree):
  return helpers.flat(tree)


def test_logical_to_spec_replicates_what_does_not_divide():
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'model'))
  rules = dict(config_lib.DEFAULT_RULES)
  assert sharding.logical_to_spec(('embed', 'mlp'), (32, 64), rules, mesh) == P('fsdp', 'model')
  assert sharding.logical_to_spec(('embed', 'mlp'), (33, 64), rules, mesh) == P(None, 'model')
  # The same mesh axis is never used twice in one spec.
  assert sharding.logical_to_spec(('embed', 'embed'), (32, 32), rules, mesh) == P('fsdp', None)
  with pytest.raises(KeyError, match="logical axis 'nope'"):
    sharding.logical_to_spec(('nope',), (4,), rules, mesh)


def test_every_weight_carries_logical_axes():
  config = smoke((-1, 1, 1))
  run = build(config)
  for graphdef, params in [(run.kpu_graphdef, run.frozen), *(
      (run.teacher_set.graphdefs[a], p) for a, p in run.teacher_set.params.items())]:
    del graphdef
    assert params  # non-empty
  # state_shardings raises on any >0-d variable without axes; all models went through it.
  _, state = assembly.abstract_split(lambda: layers.Dense(4, 4, rngs=nnx.Rngs(0)))
  for _, v in nnx.to_flat_state(state):
    assert len(layers.logical_axes(v)) == len(v.shape)


@pytest.mark.parametrize('mesh_shape', [(8, 1, 1), (2, 2, 2)])
def test_shardings_follow_the_rules(mesh_shape):
  config = smoke(mesh_shape)
  run = build(config)
  params = flat(run.state.params)
  fsdp, model = mesh_shape[1] > 1, mesh_shape[2] > 1
  # Unifier MLP: first kernel (embed -> mlp), last kernel (mlp -> embed).
  k0 = params['unifier/s2t/vitb/patch_head/dense/0/kernel']
  k1 = params['unifier/s2t/vitb/patch_head/dense/1/kernel']
  assert k0.sharding.spec == P('fsdp' if fsdp else None, 'model' if model else None)
  assert k1.sharding.spec == P('model' if model else None, 'fsdp' if fsdp else None)
  # Adam moments are sharded exactly like their parameters; counters are replicated.
  adam = run.state.opt_state[1][0]
  for moment in (adam.mu, adam.nu):
    for path, x in flat(moment).items():
      assert x.sharding == params[path].sharding, path
  assert adam.count.sharding.spec == P()
  # Frozen student base and teachers live on the mesh too.
  frozen = flat(run.frozen)
  assert frozen['student/vit/blocks/0/mlp/fc1/kernel'].sharding.spec == P(
      'fsdp' if fsdp else None, 'model' if model else None)
  # The batch is split over data x fsdp.
  batch = sharding.host_to_global({'image': images()}, run.mesh, config.sharding.rules)
  assert batch['image'].sharding.spec == P(('data', 'fsdp'), None, None, None)
  assert len(batch['image'].addressable_shards) == 8
  assert batch['image'].addressable_shards[0].data.shape[0] == 8 // (mesh_shape[0] * mesh_shape[1])


def one_step(config, devices=None):
  run = build(config, devices)
  mesh = run.mesh
  with jax.set_mesh(mesh):
    batch = sharding.host_to_global({'image': images()}, mesh, config.sharding.rules)
    state, scalars = run.step_fn(run.state, run.frozen, run.teacher_set.params, batch['image'])
    state, scalars = run.step_fn(state, run.frozen, run.teacher_set.params, batch['image'])
  return jax.device_get(scalars), jax.device_get(state.params)


def test_sharded_step_matches_single_device():
  ref_scalars, ref_params = one_step(smoke((1, 1, 1)), jax.devices()[:1])
  for mesh_shape in [(8, 1, 1), (2, 2, 2)]:
    scalars, params = one_step(smoke(mesh_shape))
    np.testing.assert_allclose(scalars['loss'], ref_scalars['loss'], rtol=1e-5)
    np.testing.assert_allclose(scalars['grad_norm'], ref_scalars['grad_norm'], rtol=1e-4)
    for path, ref in flat(ref_params).items():
      np.testing.assert_allclose(flat(params)[path], ref, atol=2e-6, rtol=1e-4, err_msg=path)
