"""Reading the folders `python -m kivfm.export` writes (`kivfm.inference.load` takes them)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from kivfm import assembly, config as config_lib, paths, sharding, teachers
from kivfm.weights import readers
from kivfm.weights.errors import ChecksumMismatchError, MissingWeightFileError
from kivfm.weights.sources import sha256_of

FORMAT, FORMAT_VERSION = 'kivfm-student', 1


def is_export(path) -> bool:
  """Whether `path` is a folder written by `kivfm.export` (its config.json names the format)."""
  config = paths.path(path) / 'config.json'
  return config.exists() and json.loads(config.read_text()).get('format') == FORMAT


def read(folder) -> tuple[nnx.Module, dict, int]:
  """An export folder back in kivfm: (the KPU, alias -> the teacher's `NativeHeads`, step); no
  teacher network is built or read."""
  folder = paths.path(folder)
  meta = json.loads((folder / 'config.json').read_text())
  if meta.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{folder}/config.json: export format version '
                     f'{meta.get("format_version")!r}; this kivfm reads {FORMAT_VERSION}')
  weights = Path(str(folder / 'model.safetensors'))
  if not weights.exists():
    raise MissingWeightFileError(f'{weights} is missing (the export is incomplete)')
  actual = sha256_of(weights)
  if actual != meta['sha256']:
    raise ChecksumMismatchError(weights, meta['sha256'], actual, ' (config.json)')
  tensors = readers.read_safetensors(weights)
  config = config_lib.from_dict(meta['kivfm_config'])
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    teacher_set = assembly.build_teachers(config, mesh, abstract=True)
    graphdef, state = assembly.abstract_split(
        lambda: assembly.build_kpu(config, teacher_set, config.seed))
    model = nnx.merge(graphdef, nnx.State(_place(tensors, '', state, weights)))
    heads = {}
    for alias in teacher_set.specs:
      teacher = nnx.merge(teacher_set.graphdefs[alias], nnx.State(teacher_set.params[alias]))
      parts = {}
      for name, part in teacher.head_parts().items():
        part_graphdef, part_state = nnx.split(part)
        parts[name] = nnx.merge(part_graphdef, nnx.State(
            _place(tensors, f'heads.{alias}.{name}.', part_state, weights)))
      heads[alias] = teachers.NativeHeads(parts, teacher.image_size, teacher.pooled_embedding)
  return model, heads, meta['step']


def _place(tensors: dict, prefix: str, abstract_state, source) -> dict:
  """The tensors `prefix` + each variable path of `abstract_state` (the file holds other
  modules' tensors too), placed by `teachers.place`, which names any missing one."""
  wanted = (readers.path_str(path, '.') for path, _ in nnx.to_flat_state(abstract_state))
  mine = {key: tensors[prefix + key] for key in wanted if prefix + key in tensors}
  return teachers.place(readers.unflatten(mine, '.'), abstract_state, str(source))
