"""kivfm.export: the exported student gives the same features and teacher predictions in kivfm,
in the one-file PyTorch module and in ONNX Runtime; bad folders fail clearly."""
import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kivfm import config as config_lib, export, inference, train
from kivfm.models import saliency, vit
from kivfm.weights.errors import ChecksumMismatchError, MissingWeightFileError

torch = pytest.importorskip('torch')
TOL = 1e-4


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 2-step run with teachers that have native heads (CLIP 'embedding', EfficientNet
  'logits'), moving normaliser statistics, exported by the command."""
  workdir = tmp_path_factory.mktemp('run')
  config = config_lib.load('configs/base.py:smoke')
  config.total_steps = config.checkpoint_every = 2
  config.unifier.normalizer = 'ema_zscore'
  del config.teachers['vitb']
  config.teachers.clip = config_lib.teacher('tiny-clip', weights='random', dtype='float32')
  config.teachers.effnet = config_lib.teacher('efficientnet-lite0', weights='random',
                                              dtype='float32', image_size=32)
  train.train_and_evaluate(config, str(workdir))
  out = tmp_path_factory.mktemp('export') / 'student'
  subprocess.run([sys.executable, '-m', 'kivfm.export', f'--workdir={workdir}', f'--out={out}'],
                 check=True, capture_output=True, text=True)
  return workdir, out


def images(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def nchw(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def test_export_folder_is_a_hub_model_folder(run):
  _, out = run
  assert sorted(p.name for p in out.iterdir()) == [
      'README.md', 'config.json', 'kivfm_student.py', 'model.onnx', 'model.safetensors']
  meta = json.loads((out / 'config.json').read_text())
  assert meta['step'] == 2 and meta['format'] == export.FORMAT
  assert meta['teachers']['effnet']['heads'] == ['logits']
  assert meta['teachers']['clip']['heads'] == ['embedding']
  card = (out / 'README.md').read_text()
  assert card.startswith('---\nlibrary_name: kivfm') and 'efficientnet-lite0' in card


def test_kivfm_loads_the_export_without_teachers_and_computes_the_same(run):
  workdir, out = run
  original, exported = inference.load(str(workdir)), inference.load(str(out))
  x = images((2, 32, 32, 3))
  for key in ('cls', 'patches'):
    np.testing.assert_array_equal(original.features(x)[key], exported.features(x)[key])
  for alias in ('clip', 'dino', 'effnet'):
    a, b = original.as_teacher(alias)(x), exported.as_teacher(alias)(x)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], atol=1e-6)
  with pytest.raises(ValueError, match='only the heads'):
    exported.teacher('effnet')


def test_torch_module_matches_kivfm_at_any_size(run):
  workdir, out = run
  student = inference.load(str(workdir))
  model = export.torch_module(out).KivfmStudent.from_pretrained(str(out))
  for shape in ((2, 32, 32, 3), (1, 24, 40, 3), (1, 44, 20, 3)):   # 44x20 -> 48x24 (patch 8)
    x = images(shape, seed=shape[1])
    want = student.features(x, size='input')
    cls, patches = model(nchw(x))
    assert patches.shape == want['patches'].shape
    np.testing.assert_allclose(cls.numpy(), want['cls'], atol=TOL)
    np.testing.assert_allclose(patches.numpy(), want['patches'], atol=TOL)
  x = images((2, 32, 32, 3))
  for alias in ('clip', 'dino', 'effnet'):
    want, got = student.as_teacher(alias)(x), model.predict(nchw(x), alias)
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_allclose(got[key].numpy(), want[key], atol=TOL, err_msg=f'{alias}.{key}')


def test_onnx_runtime_matches_kivfm(run):
  ort = pytest.importorskip('onnxruntime')
  workdir, out = run
  student = inference.load(str(workdir))
  session = ort.InferenceSession(str(out / 'model.onnx'))
  x = images((3, 32, 32, 3), seed=5)
  names = [o.name for o in session.get_outputs()]
  got = dict(zip(names, session.run(None, {'images': x.transpose(0, 3, 1, 2).astype(np.float32)})))
  want = {**student.features(x)}
  for alias in ('clip', 'dino', 'effnet'):
    want.update({f'{alias}.{k}': v for k, v in student.as_teacher(alias)(x).items()})
  assert sorted(names) == sorted(want)
  for name in names:
    np.testing.assert_allclose(got[name], want[name], atol=TOL, err_msg=name)


def test_torch_module_loads_a_hub_repo_id_through_snapshot_download(run, monkeypatch):
  _, out = run
  huggingface_hub = pytest.importorskip('huggingface_hub')
  calls = []
  monkeypatch.setattr(huggingface_hub, 'snapshot_download',
                      lambda repo, revision=None: calls.append((repo, revision)) or str(out))
  module = export.torch_module(out)
  model = module.KivfmStudent.from_pretrained('someone/kivfm-demo', revision='v1')
  assert calls == [('someone/kivfm-demo', 'v1')] and set(model.teachers) == {'clip', 'dino',
                                                                             'effnet'}


def test_bad_export_folders_fail_naming_the_problem(run, tmp_path):
  _, out = run
  broken = tmp_path / 'broken'
  shutil.copytree(out, broken)
  data = bytearray((broken / 'model.safetensors').read_bytes())
  data[-1] ^= 0xFF
  (broken / 'model.safetensors').write_bytes(bytes(data))
  with pytest.raises(ChecksumMismatchError, match='sha256'):
    inference.load(str(broken))
  (broken / 'model.safetensors').unlink()
  with pytest.raises(MissingWeightFileError, match='model.safetensors'):
    inference.load(str(broken))
  module = export.torch_module(out)
  with pytest.raises(KeyError, match='student.vit.norm.scale'):
    tensors = module.read_safetensors(str(out / 'model.safetensors'))
    del tensors['student.vit.norm.scale']
    module.KivfmStudent(json.loads((out / 'config.json').read_text()), tensors)


def _torch_part(out, cls_name, module):
  """The torch module `cls_name` loaded from the kivfm module's own parameters."""
  torch_student = export.torch_module(out)
  tensors = {k: torch.from_numpy(v) for k, v in export._flat_state(module, '').items()}
  return getattr(torch_student, cls_name)(torch_student._Params(tensors))


def test_torch_saliency_and_neck_heads_match_kivfm(run):
  _, out = run
  rng = np.random.default_rng(3)
  decoder = saliency.SaliencyDecoder(16, (8, 6, 4), rngs=nnx.Rngs(0))
  for up in decoder.ups:   # non-trivial BatchNorm statistics
    up.bn.mean[...] = jnp.asarray(rng.normal(size=up.bn.mean.shape), jnp.float32)
    up.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2, size=up.bn.var.shape), jnp.float32)
  patches = rng.normal(size=(2, 3, 5, 16)).astype(np.float32)
  got = _torch_part(out, 'Saliency', decoder)(torch.from_numpy(patches), (20, 36))
  np.testing.assert_allclose(got.numpy(), decoder(jnp.asarray(patches), (20, 36)), atol=TOL)
  neck = vit.Neck(16, 8, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  got = _torch_part(out, 'Neck', neck)(torch.from_numpy(patches))
  np.testing.assert_allclose(got.numpy(), neck(jnp.asarray(patches)), atol=TOL)


def test_push_to_hub_uploads_the_folder(run, monkeypatch):
  huggingface_hub = pytest.importorskip('huggingface_hub')
  _, out = run
  calls = []

  class FakeApi:
    def create_repo(self, repo_id, exist_ok):
      calls.append(('create', repo_id, exist_ok))

    def upload_folder(self, folder_path, repo_id):
      calls.append(('upload', folder_path, repo_id))
      return f'https://huggingface.co/{repo_id}/commit/0'

  monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
  assert export.push_to_hub(out, 'me/kivfm-demo').endswith('/commit/0')
  assert calls == [('create', 'me/kivfm-demo', True), ('upload', str(out), 'me/kivfm-demo')]


def test_torch_vit_matches_kivfm_with_rotary_positions():
  """The PyTorch module's ViT with a DINOv3-shaped knowledge base (rotary positions, storage
  tokens, no key bias) at a square and a non-square size."""
  import dataclasses
  from kivfm import teachers, torch_student
  from kivfm.weights.readers import flatten
  teacher = teachers.build('tiny-dinov3', dtype=jnp.float32, seed=1)
  arch = dataclasses.asdict(teacher.spec.arch)
  state = flatten(nnx.to_pure_dict(nnx.state(teacher.model)), sep='.')
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  assert 'pos_embed' not in tensors and 'blocks.0.attn.key.bias' not in tensors
  model = torch_student.ViT(torch_student._Params(tensors), arch,
                            {'kind': 'bottleneck', 'lora_alpha': 1.0, 'lora_rank': 1})
  for shape in ((2, 32, 32, 3), (1, 24, 48, 3)):
    x = np.random.default_rng(shape[1]).normal(size=shape).astype(np.float32)
    want = teacher.model(x)
    cls, patches = model(torch.from_numpy(x))
    np.testing.assert_allclose(cls.numpy(), want['cls'], atol=TOL)
    np.testing.assert_allclose(patches.numpy(), want['patches'], atol=TOL)
