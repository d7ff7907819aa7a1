"""The PyTorch peer's weights in kivfm's run, so both compute the same step from the same
parameters: teachers through kivfm's own converters (`vit_port.from_dinov2_hf`,
`efficientnet_port.convert_efficientnet_lite`), the frozen student as the knowledge-base teacher,
adapters and heads Linear -> Dense ([out, in] -> [in, out]) and LayerNorm -> (scale, bias)."""
from __future__ import annotations

import jax
import numpy as np
from torch import nn

from benchmarks.kivfm_side import KivfmStep
from benchmarks.torch_peer import Peer
from kivfm.teachers import efficientnet_port, registry, vit_port
from kivfm.weights.readers import flatten, path_str


def _numpy(module: nn.Module) -> dict:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _layers(prefix: str, module: nn.Module) -> dict:
  """kivfm path -> value of every Linear and LayerNorm under `module` (torch names kept)."""
  out = {}
  for name, sub in module.named_modules():
    path = f'{prefix}/{name.replace(".", "/")}'
    if isinstance(sub, nn.Linear):
      out[f'{path}/kernel'] = sub.weight.detach().numpy().T
      out[f'{path}/bias'] = sub.bias.detach().numpy()
    elif isinstance(sub, nn.LayerNorm):
      out[f'{path}/scale'] = sub.weight.detach().numpy()
      out[f'{path}/bias'] = sub.bias.detach().numpy()
  return out


def _fill(tree, values: dict):
  """`tree` (jax arrays) with every leaf whose path is in `values` replaced, same sharding;
  every value must land somewhere."""
  used = set()

  def one(path, old):
    key = path_str(path)
    if key not in values:
      return old
    used.add(key)
    return jax.device_put(np.asarray(values[key], old.dtype).reshape(old.shape), old.sharding)

  tree = jax.tree_util.tree_map_with_path(one, tree)
  if used != set(values):
    raise KeyError(f'no kivfm parameter for {sorted(set(values) - used)[:5]}')
  return tree


def load_peer_weights(step: KivfmStep, peer: Peer) -> None:
  """Replaces the parameters of `step`'s run (teachers, frozen student, adapters, heads) by the
  peer's; the optimizer state stays at its (zero) start."""
  config = step.config
  dino_arch = registry.get(config.teachers.dino.name).arch
  effnet_arch = registry.get(config.teachers.effnet.name).arch
  vit = flatten(vit_port.from_dinov2_hf(_numpy(peer.teachers['dino'].vit), dino_arch))
  effnet = flatten(efficientnet_port.convert_efficientnet_lite(
      _numpy(peer.teachers['effnet'].model), effnet_arch))
  teachers = dict(step.teachers)
  teachers['dino'] = _fill(teachers['dino'], {f'model/{k}': v for k, v in vit.items()})
  teachers['effnet'] = _fill(teachers['effnet'], {f'model/{k}': v for k, v in effnet.items()})
  step.teachers = step.run.teacher_set.params = teachers
  step.run.frozen = _fill(step.run.frozen, {f'student/vit/{k}': v for k, v in vit.items()})
  trainable = {}
  for i, adapter in enumerate(peer.student.adapters):
    trainable.update(_layers(f'student/vit/blocks/{i}/adapter', adapter))
  for alias, head in peer.heads.items():
    trainable.update(_layers(f'unifier/s2t/{alias}', head))
  step.state = step.state.replace(params=_fill(step.state.params, trainable))
