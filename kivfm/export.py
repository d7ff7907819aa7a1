"""Exports a trained student for use outside kivfm.

  python -m kivfm.export --workdir=runs/demo --out=exports/demo [--step=N] [--onnx_size=H,W]
      [--push_to_hub=user/name]

OUT/ is a Hugging Face Hub model folder:
  model.safetensors   the student (frozen knowledge base + adapters), the s2t heads, the
                      teachers' native heads it can drive, and each teacher's de-normalisation
                      as an affine map (float32)
  config.json         architecture, preprocessing, teachers, step, the kivfm run config and the
                      sha256 of model.safetensors (checked on load)
  README.md           model card: teachers (sources, licences), data, steps, evaluation numbers
  kivfm_student.py    a one-file PyTorch module (torch only) that loads the folder or a repo id
  model.onnx          features and every teacher prediction (opset 17) at --onnx_size (default:
                      the training size), when torch is installed
`kivfm.inference.load(OUT)` loads the folder back into kivfm without any teacher's weights
(`kivfm.exported`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from kivfm import assembly, config as config_lib, inference, paths, sharding
from kivfm.exported import FORMAT, FORMAT_VERSION
from kivfm.weights import readers
from kivfm.weights.sources import sha256_of

TORCH_MODULE = Path(__file__).with_name('torch_student.py')


# ------------------------------------------------------------------------------------- write


def _flat_state(module, prefix: str) -> dict[str, np.ndarray]:
  return {f'{prefix}{readers.path_str(p, ".")}': np.asarray(jax.device_get(v.get_value()),
                                                          np.float32)
          for p, v in nnx.to_flat_state(nnx.state(module))}


def _inverse_affine(unifier, alias: str, width: int) -> dict[str, np.ndarray]:
  """The teacher's de-normaliser x = y @ matrix + bias (every kivfm normaliser is affine),
  read off the kivfm normaliser on zero and the unit vectors."""
  basis = jnp.concatenate([jnp.zeros((1, width)), jnp.eye(width)])
  out = unifier.to_teacher_space(alias, {'cls': basis, 'patches': basis[None, None]})
  tensors = {}
  for role, x in (('cls', out['cls']), ('patches', out['patches'][0, 0])):
    x = np.asarray(x, np.float64)
    tensors[f'inverse.{alias}.{role}.bias'] = x[0].astype(np.float32)
    tensors[f'inverse.{alias}.{role}.matrix'] = (x[1:] - x[0]).astype(np.float32)
  return tensors


def tensors_of(student: inference.Inherited) -> dict[str, np.ndarray]:
  """Every exported tensor by name: 'student.*' and 'unifier.*' (kivfm's own paths),
  'heads.<alias>.<output>.*' (native heads) and 'inverse.<alias>.<cls|patches>.*'."""
  tensors = _flat_state(student.model, '')
  unifier = student.model.unifier
  for alias, teacher in student.teachers.items():
    for name, part in teacher.head_parts().items():
      tensors.update(_flat_state(part, f'heads.{alias}.{name}.'))
    width = unifier.s2t[alias].global_head.dense[-1].kernel.shape[-1]
    tensors.update(_inverse_affine(unifier, alias, width))
  return tensors


def describe(config, run_config: dict, step: int, teacher_set) -> dict:
  """config.json without the checksum: what the PyTorch module needs, and the kivfm config."""
  kb = teacher_set.specs[config.student.knowledge_base]
  arch = {k: v for k, v in dataclasses.asdict(kb.arch).items() if not k.startswith('attention')}
  s, u = config.student, config.unifier
  described = {}
  for alias, spec in sorted(teacher_set.specs.items()):
    teacher = nnx.merge(teacher_set.graphdefs[alias], nnx.State(teacher_set.params[alias]))
    width, grid = teacher_set.shapes[alias]
    described[alias] = {
        'name': spec.name, 'width': width, 'grid': list(grid),
        'image_size': list(teacher.image_size), 'heads': sorted(teacher.head_parts()),
        'pooled_embedding': teacher.pooled_embedding, 'licence': spec.licence,
        'sources': [f'{src.kind}:{src.name}/{src.file}'.rstrip('/') for src in spec.sources]}
  return {
      'format': FORMAT, 'format_version': FORMAT_VERSION, 'step': step,
      'image_size': [config.data.image_size] * 2, 'mean': list(kb.mean), 'std': list(kb.std),
      'knowledge_base': kb.name, 'vit': arch,
      'adapter': {'kind': s.adapter, 'dim': s.adapter_dim, 'scale': s.adapter_scale,
                  'lora_rank': s.lora_rank, 'lora_alpha': s.lora_alpha, 'blocks': s.adapter_blocks},
      'unifier': {'hidden': u.hidden, 'layers': u.layers},
      'teachers': described, 'kivfm_config': run_config}


def eval_rows(record: dict) -> list[str]:
  """Markdown table rows of the headline numbers of one `kivfm.evaluate` record."""
  skip = ('held_out', 'per_class', 'weight_decay', 'images', 'train_loss')
  return [f'| {record["protocol"]} | {key} | {value:.4f} |'
          for key, value in readers.flatten(record.get('results', {}), '.').items()
          if isinstance(value, float) and math.isfinite(value) and not any(s in key for s in skip)]


def _eval_rows(workdir) -> list[str]:
  """`eval_rows` of every student record in DIR/eval."""
  records = (json.loads(f.read_text())
             for f in sorted((paths.path(workdir) / 'eval').glob('*.json')))
  return [row for record in records if record.get('model') == 'student'
          for row in eval_rows(record)]


def model_card(meta: dict, workdir) -> str:
  c = meta['kivfm_config']
  teachers_rows = [f'| {a} | {t["name"]} | {t["width"]} | {t["image_size"][0]} px | '
                   f'{", ".join(t["heads"]) or "-"} | {t["licence"] or "see source"} | '
                   f'{"; ".join(t["sources"]) or "random init"} |'
                   for a, t in meta['teachers'].items()]
  evals = _eval_rows(workdir) or ['| - | no evaluation in the run folder | - |']
  return '\n'.join([
      '---', 'library_name: kivfm', 'pipeline_tag: image-feature-extraction',
      'tags: [vision, feature-extraction, knowledge-distillation, kivfm]', '---', '',
      f'# kivfm student ({meta["knowledge_base"]} + {meta["adapter"]["kind"]} adapters)', '',
      'A vision foundation model trained by knowledge inheritance with '
      '[kivfm](https://github.com/kivfm/kivfm): the frozen knowledge base plus trainable '
      'adapters, distilled from the teachers below. It gives general features and predicts each '
      "teacher's features, which feed that teacher's own heads.", '',
      f'- steps: {meta["step"]}, batch {c["data"]["batch_size"]}, views of '
      f'{c["data"]["image_size"]} px; data: `{c["data"]["source"]}`',
      f'- loss: patches `{c["loss"]["patch"]}`, global `{c["loss"]["global_"]}`; shared space '
      f'width {c["unifier"]["shared_dim"]}', '',
      '## Teachers', '', '| alias | teacher | width | input | native heads | licence | weights |',
      '|---|---|---|---|---|---|---|', *teachers_rows, '',
      'The licences of the teachers apply to this student as a derived work.', '',
      '## Evaluation (kivfm.evaluate on the run)', '', '| protocol | metric | value |',
      '|---|---|---|', *evals, '',
      '## Use', '', '```python',
      'from kivfm_student import KivfmStudent            # this folder, torch only',
      'model = KivfmStudent.from_pretrained(".")          # or a Hub repo id',
      'features = model(images)            # uint8 / float [B, 3, H, W] in 0..255, any size',
      f'out = model.predict(images, "{next(iter(meta["teachers"]))}")   # teacher-space '
      "features + that teacher's heads",
      '```', '', 'In kivfm: `kivfm.inference.load("<this folder>")`. '
      '`model.onnx` (opset 17) takes float [B, 3, H, W] images at the size recorded in '
      'config.json (`onnx`).', ''])


def export(workdir: str, out: str, step: int | None = None,
           onnx_size: tuple[int, int] | None = None) -> Path:
  """Writes the export folder `out` for the run in `workdir` (checkpoint `step`, default the
  latest); returns its path. The ONNX file is skipped (with a warning) without torch."""
  student = inference.load(workdir, step)
  run_config = json.loads((paths.path(workdir) / 'config.json').read_text())
  config = config_lib.from_dict(run_config)
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    teacher_set = assembly.build_teachers(config, mesh, abstract=True)
  meta = describe(config, run_config, student.step, teacher_set)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors_of(student), out / 'model.safetensors',
                              metadata={'format': FORMAT})
  (out / 'model.safetensors').chmod(0o644)   # the writer creates it private
  meta['sha256'] = sha256_of(out / 'model.safetensors')
  size = list(onnx_size or meta['image_size'])
  with_onnx = importlib.util.find_spec('torch') is not None
  if with_onnx:
    meta['onnx'] = {'file': 'model.onnx', 'image_size': size, 'opset': 17}
  else:
    logging.warning('torch is not installed: no model.onnx (pip install torch, then re-run)')
  (out / 'config.json').write_text(json.dumps(meta, indent=2))
  (out / 'README.md').write_text(model_card(meta, workdir))
  shutil.copyfile(TORCH_MODULE, out / 'kivfm_student.py')
  if with_onnx:
    torch_module(out).export_onnx(out, out / 'model.onnx', tuple(size))
  return out


def torch_module(folder):
  """The `kivfm_student` module file of an export folder, imported under a private name."""
  spec = importlib.util.spec_from_file_location(f'kivfm_student_{abs(hash(str(folder)))}',
                                                Path(folder) / 'kivfm_student.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def push_to_hub(folder, repo_id: str) -> str:
  """Uploads the export folder to the Hugging Face Hub (needs network and a token)."""
  from huggingface_hub import HfApi
  api = HfApi()
  api.create_repo(repo_id, exist_ok=True)
  return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id))


# -------------------------------------------------------------------------------------- main


def main(argv) -> None:
  from absl import flags
  f = flags.FLAGS
  size = tuple(int(x) for x in f.onnx_size.split(',')) if f.onnx_size else None
  if size is not None and len(size) != 2:
    raise SystemExit(f'--onnx_size={f.onnx_size!r}: give H,W')
  out = export(f.workdir, f.out, f.step, size)
  print(f'exported to {out}')
  if f.push_to_hub:
    print(f'uploaded: {push_to_hub(out, f.push_to_hub)}')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'run folder (config.json + checkpoints)', required=True)
  flags.DEFINE_string('out', None, 'export folder to write', required=True)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)')
  flags.DEFINE_string('onnx_size', '', 'H,W of the ONNX graph (default: the training size)')
  flags.DEFINE_string('push_to_hub', '', 'Hub repo id to upload the folder to (network)')
  app.run(main)
