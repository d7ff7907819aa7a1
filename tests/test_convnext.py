"""Parity of `kivfm.models.convnext.ConvNeXt` + `kivfm.teachers.convnext_port` with randomly
initialised transformers `DINOv3ConvNextModel`s (no download), at two configs and two input
sizes (square; non-square with sides not divisible by 32), through the HF layout (in memory, hub
names, an outer prefix) and the facebookresearch/dinov3 layout. float32, max-abs <= 1e-4."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from flax import nnx

transformers = pytest.importorskip('transformers')

from kivfm.models.convnext import ConvNeXt, ConvNeXtConfig, convnext_config  # noqa: E402
from kivfm.teachers import convnext_port  # noqa: E402
from kivfm.weights.errors import ShapeMismatchError  # noqa: E402

from helpers import perturb, ported, torch_images  # noqa: E402

TOL = 1e-4
BATCH = 2
FAST_COMPILE = {'xla_backend_optimization_level': 0}  # tiny models: compile time dominates
SIZES = [(64, 64), (72, 104)]  # 72 x 104: a stride-2 downsampling floors an odd side
CONFIGS = {
    'w8': dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1]),
    'w12-ls0.5': dict(hidden_sizes=[12, 20, 16, 24], depths=[2, 1, 1, 2],
                      layer_scale_init_value=0.5),
}


@functools.cache
def _case(name: str):
  """(HF state dict, our config, jitted forward, {size: (images, HF reference)})."""
  seed = list(CONFIGS).index(name)
  with torch.random.fork_rng():  # HF initialises from the global generator
    torch.manual_seed(seed)
    hf = perturb(transformers.DINOv3ConvNextModel(
        transformers.DINOv3ConvNextConfig(**CONFIGS[name])), seed)
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  cfg = convnext_port.config_from_hf(hf.config)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: ConvNeXt(cfg, rngs=nnx.Rngs(0))))
  every = tuple(range(len(cfg.dims)))
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_layers=every),
                    compiler_options=FAST_COMPILE)
  refs = {}
  for i, size in enumerate(SIZES):
    x = torch_images(BATCH, size, i)
    with torch.no_grad():
      out = hf(pixel_values=x, output_hidden_states=True)
    last = out.last_hidden_state.numpy()
    grid = out.hidden_states[-1].shape[2:]
    refs[size] = x, {'cls': out.pooler_output.numpy(),
                     'patches': last[:, 1:].reshape(BATCH, *grid, -1),
                     'hidden': [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states[1:]]}
  return state, cfg, forward, refs


def _to_original(state: dict) -> dict:
  """HF in-memory state dict -> the facebookresearch/dinov3 layout, with its duplicate `norms.3`."""
  out = {}
  for key, value in state.items():
    key = key.removeprefix('model.')
    if key.startswith('layer_norm.'):
      key = key.replace('layer_norm', 'norm')
      out[key.replace('norm', 'norms.3')] = value
    elif '.downsample_layers.' in key:  # stages.i.downsample_layers.k -> downsample_layers.i.k
      _, i, _, k, t = key.split('.')
      key = f'downsample_layers.{i}.{k}.{t}'
    else:
      for old, new in [('layers.', ''), ('depthwise_conv', 'dwconv'), ('layer_norm', 'norm'),
                       ('pointwise_conv', 'pwconv')]:
        key = key.replace(old, new)
    out[key] = value
  return out


LAYOUTS = {
    'hf': (convnext_port.from_dinov3_convnext_hf, lambda s: s),
    'hub': (convnext_port.from_dinov3_convnext_hf,
            lambda s: {k.removeprefix('model.'): v for k, v in s.items()}),
    'hf-prefixed': (convnext_port.from_dinov3_convnext_hf,
                    lambda s: {'backbone.' + k: v for k, v in s.items()}),
    'original': (convnext_port.from_dinov3_convnext_original, _to_original),
}


@pytest.mark.parametrize('layout', list(LAYOUTS))
@pytest.mark.parametrize('name', list(CONFIGS))
def test_parity(name, layout):
  state, cfg, forward, refs = _case(name)
  convert, rename = LAYOUTS[layout]
  model = ported(lambda: ConvNeXt(cfg, rngs=nnx.Rngs(0)), convert(rename(state), cfg))
  params = nnx.state(model)
  for size, (x, ref) in refs.items():
    ours = jax.tree.map(np.asarray, forward(params, x.permute(0, 2, 3, 1).numpy()))
    errors = {}
    for key, want in ref.items():
      got, want = (ours[key], want) if key == 'hidden' else ([ours[key]], [want])
      assert [g.shape for g in got] == [w.shape for w in want], (size, key)
      errors[key] = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    print(f'{name} {layout} {size}: ' + ', '.join(f'{k} {v:.1e}' for k, v in errors.items()))
    assert max(errors.values()) <= TOL, (size, errors)
    assert float(np.abs(ref['patches']).mean()) > 0.05, 'degenerate reference'


def test_port_reports_every_key_problem():
  state, cfg, _, _ = _case('w8')
  state = dict(state)
  del state['model.stages.2.layers.1.gamma']
  state['model.stages.0.layers.0.bogus'] = np.zeros(3, np.float32)
  state['layer_norm.weight'] = np.zeros(7, np.float32)
  with pytest.raises(ShapeMismatchError) as err:
    convnext_port.from_dinov3_convnext_hf(state, cfg)
  for key in ('model.stages.2.layers.1.gamma', 'model.stages.0.layers.0.bogus',
              'layer_norm.weight'):
    assert key in str(err.value)


def test_original_port_reports_missing_final_norm():
  state, cfg, _, _ = _case('w8')
  original = _to_original(state)
  del original['norm.bias']
  with pytest.raises(ShapeMismatchError, match=r'norm\.bias') as err:
    convnext_port.from_dinov3_convnext_original(original, cfg)
  assert 'norms.3' not in str(err.value)


@pytest.mark.parametrize('size', ['tiny', 'small', 'base', 'large'])
def test_config_from_hf_round_trips(size):
  cfg = convnext_config(size)
  hf_config = transformers.DINOv3ConvNextConfig(
      hidden_sizes=list(cfg.dims), depths=list(cfg.depths), layer_norm_eps=cfg.norm_eps,
      layer_scale_init_value=cfg.layerscale)
  assert convnext_port.config_from_hf(hf_config) == cfg
  assert cfg.width == cfg.dims[-1]


def test_config_errors():
  assert convnext_port.config_from_hf(transformers.DINOv3ConvNextConfig()) == ConvNeXtConfig()
  with pytest.raises(ValueError, match='relu'):
    convnext_port.config_from_hf(transformers.DINOv3ConvNextConfig(hidden_act='relu'))
  with pytest.raises(ValueError, match='tiny, small, base, large'):
    convnext_config('huge')
