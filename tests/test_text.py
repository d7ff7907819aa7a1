"""Text towers (CLIP, SigLIP, SigLIP2) against transformers, every registered text tower's
embedding width, the tokenizers (CLIP's against open-clip's) and the zero-shot evaluator."""
import dataclasses
import importlib.metadata
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kivfm import config as config_lib, inference, sharding
from kivfm.evals import zero_shot
from kivfm.teachers import registry
from kivfm.text import towers
from kivfm.text.tokenizer import ClipTokenizer

transformers = pytest.importorskip('transformers')


def _ids():
  """Three texts of 16 tokens: start 98, end 99 (the largest id), zero padding."""
  ids = np.zeros((3, 16), np.int64)
  ids[:, 0] = 98
  ids[0, 1:5] = [5, 6, 7, 99]
  ids[1, 1:3] = [9, 99]
  ids[2, 1:15], ids[2, 15] = np.arange(10, 24), 99
  return ids


def _state(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_clip_text_tower_matches_transformers():
  torch.manual_seed(0)
  hf = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, projection_dim=24, bos_token_id=98,
      eos_token_id=99)).eval()
  cfg = towers.TextConfig(vocab=100, width=32, depth=2, heads=4, mlp=64, context=16,
                          proj_dim=24, end_token=99)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(_ids())).text_embeds.numpy()
  np.testing.assert_allclose(towers.port_hf(cfg, _state(hf))(_ids()), want, atol=1e-5)


@pytest.mark.parametrize('family,teacher,width,heads', [
    ('Siglip', 'siglip-vitb16', 32, 4), ('Siglip2', 'siglip2-vitb16-224', 48, 3)])
def test_siglip_text_towers_match_transformers(family, teacher, width, heads):
  """SigLIP and SigLIP2 text models (random) against the registered teacher's text config."""
  torch.manual_seed(0)
  hf = getattr(transformers, f'{family}TextModel')(getattr(transformers, f'{family}TextConfig')(
      vocab_size=100, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=heads, max_position_embeddings=16, projection_size=20, bos_token_id=98,
      eos_token_id=99, pad_token_id=0)).eval()
  cfg = dataclasses.replace(registry.get(teacher).text, vocab=100, width=width, depth=2,
                            heads=heads, mlp=64, context=16, proj_dim=20)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(_ids())).pooler_output.numpy()
  np.testing.assert_allclose(towers.port_hf(cfg, _state(hf))(_ids()), want, atol=1e-5)
  state = _state(hf)
  del state['head.bias']
  with pytest.raises(KeyError, match="'head.bias' is missing"):
    towers.port_hf(cfg, state)


def _text_towers() -> dict:
  """(text config, image embedding width) -> the registered teachers that have them."""
  towers_ = {}
  for name in registry.names():
    spec = registry.get(name)
    if spec.text:
      towers_.setdefault((spec.text, spec.arch.proj_dim or spec.arch.width), []).append(name)
  return towers_


@pytest.mark.parametrize('text,image_width,names', [
    pytest.param(*key, names, id=names[0]) for key, names in _text_towers().items()])
def test_registered_text_towers_embed_where_their_images_do(text, image_width, names,
                                                            fast_tracing):
  """Every image-text teacher's text tower builds, and its embeddings have the width of the
  image embeddings (CLIP's projection, SigLIP's pooled vector), so zero-shot can compare them."""
  ids = jax.ShapeDtypeStruct((2, text.context), jnp.int32)
  out = jax.eval_shape(lambda i: towers.TextTower(text, nnx.Rngs(0))(i), ids)
  assert out.shape == (2, image_width), names


def test_siglip_prompts_are_tokenized_by_the_teachers_own_tokenizer(monkeypatch):
  calls = []

  class Tokenizer:
    def __call__(self, texts, **kw):
      calls.append((texts, kw['max_length']))
      return {'input_ids': np.zeros((len(texts), kw['max_length']), np.int64)}

  monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained',
                      lambda repo: calls.append(repo) or Tokenizer())
  for name in ('siglip-vitb16', 'siglip2-so400m16-naflex'):
    zero_shot.tokenize(registry.get(name), ['A Photo of a Coat.'])
  assert calls == ['google/siglip-base-patch16-224', (['A Photo of a Coat.'], 64),
                   'google/siglip2-so400m-patch16-naflex', (['a photo of a coat.'], 64)]


def _open_clip_tokenize():
  """open-clip's tokenizer module, loaded alone (the package's __init__ needs torchvision)."""
  pytest.importorskip('ftfy')
  try:
    dist = importlib.metadata.distribution('open_clip_torch')
  except importlib.metadata.PackageNotFoundError:
    pytest.skip('needs open-clip-torch (requirements-assets.txt)')
  file = next(f for f in dist.files if str(f).endswith('open_clip/tokenizer.py'))
  spec = importlib.util.spec_from_file_location('open_clip_tokenizer', dist.locate_file(file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.tokenize


def test_clip_tokenizer_matches_open_clip():
  reference = _open_clip_tokenize()
  texts = ['a photo of a t-shirt/top.', 'A  blurry PHOTO of the ankle boot!!',
           "it's 2026 &amp; naïve café, 東京 and 42 cats", 'x' * 200, '']
  ours = ClipTokenizer.from_bpe_file()
  np.testing.assert_array_equal(ours(texts), reference(texts).numpy())
  assert ours(['a'])[0, :3].tolist() == [49406, 320, 49407]


class FixedTower:
  """Prompt i's embedding: e_{class(i)} + 0.1 * e_{C + template(i)}, before normalisation."""

  def __init__(self, classes, templates):
    self.classes, self.templates = classes, templates

  def __call__(self, ids):
    out = np.zeros((len(ids), self.classes + self.templates))
    for i in range(len(ids)):
      out[i, i // self.templates] = 1
      out[i, self.classes + i % self.templates] = 0.1
    return out


def test_class_embeddings_average_normalised_prompts(monkeypatch):
  monkeypatch.setattr(zero_shot, 'tokenize', lambda spec, texts: np.zeros((len(texts), 1)))
  got = zero_shot.class_embeddings(FixedTower(3, 2), None, ['a', 'b', 'c'], ('{}', 'x {}'))
  want = np.zeros((3, 5))
  want[np.arange(3), np.arange(3)] = 1
  want[:, 3:] = 0.05
  np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True))


def test_zero_shot_through_a_teacher_and_the_student(monkeypatch):
  """A run with a CLIP-shaped teacher (random towers): teacher and student accuracies and their
  agreement, on real Fashion-MNIST images and the real tokenizer."""
  config = config_lib.load('configs/base.py:smoke')
  config.teachers.clip = config_lib.teacher('tiny-clip', weights='random', dtype='float32')
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    import helpers
    run = helpers.build_run(config, mesh)
  protocol = config_lib.load('configs/eval/zero_shot_fashion_mnist.py:tiny')
  evaluator = zero_shot.ZeroShot(protocol.evals.zero_shot, protocol)
  results = evaluator.evaluate(inference.from_run(run, run.state))
  assert results['images'] == 64 and results['chance'] == 0.1
  assert set(results['accuracy']) == {'clip'}          # the only teacher with a text tower
  assert set(results['accuracy']['clip']) == {'teacher', 'student', 'agreement'}
  assert all(0 <= v <= 1 for v in results['accuracy']['clip'].values())
  assert registry.get('clip-vitl14').text.width == 768
