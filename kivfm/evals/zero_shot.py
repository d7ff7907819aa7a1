"""Zero-shot classification through image-text teachers (evaluator 'zero_shot'): the teacher
itself and the student standing in for it.

Every class name goes through each prompt template and the teacher's text tower; the class
embedding is the normalised mean of the normalised prompt embeddings. An image is assigned the
class of highest cosine with its embedding: the teacher's own ('teacher'), or the student's
prediction of it through the unifier and the teacher's projection ('student'). Reported: both
accuracies and how often their predictions agree. Every teacher of the model with a text tower
(`TeacherSpec.text`: CLIP, SigLIP) is evaluated. Class names: 'fashion_mnist' or a text file
with one name per line, in label order. Tokenizers: CLIP's BPE (`kivfm.text.tokenizer`),
SigLIP's SentencePiece through transformers (Hub or its cache).
"""
from __future__ import annotations

import numpy as np

from kivfm import teachers as teachers_lib
from kivfm.data import offline
from kivfm.evals.classification import labelled_images
from kivfm.evals.report import batched
from kivfm.text import towers
from kivfm.text.tokenizer import default_tokenizer
from kivfm.weights import readers

# Our own short ensemble: plain, blurry, grey, small, close-up, drawn.
TEMPLATES = ('a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
             'a low resolution photo of a {}.', 'a close-up photo of the {}.',
             'a drawing of a {}.')


def class_names(spec: str) -> list[str]:
  if spec == 'fashion_mnist':
    return list(offline.FASHION_MNIST_CLASSES)
  with open(spec, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def text_tower(spec, weights: str, seed: int = 0) -> towers.TextTower:
  """The teacher's text tower: 'pretrained' (its registry source), 'random' or a weight file."""
  from flax import nnx
  if weights == 'random':
    return towers.TextTower(spec.text, nnx.Rngs(seed))
  return towers.port_hf(spec.text, readers.read(teachers_lib.weight_file(spec, weights)))


def tokenize(spec, texts: list[str]) -> np.ndarray:
  if spec.text.end_token is not None:     # CLIP
    return default_tokenizer()(texts, spec.text.context)
  from transformers import AutoTokenizer  # SigLIP's SentencePiece, SigLIP2's Gemma tokenizer
  tokenizer = AutoTokenizer.from_pretrained(spec.sources[0].name)   # the teacher's own repo
  texts = [t.lower() for t in texts] if spec.text.lowercase else texts
  return tokenizer(texts, padding='max_length', max_length=spec.text.context,
                   truncation=True, return_tensors='np')['input_ids']


def _normalise(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_embeddings(tower, spec, names: list[str], templates) -> np.ndarray:
  """[classes, dim]: per class, the normalised mean of its normalised prompt embeddings."""
  prompts = [template.format(name) for name in names for template in templates]
  embedded = _normalise(np.asarray(tower(tokenize(spec, prompts)), np.float64))
  return _normalise(embedded.reshape(len(names), len(templates), -1).mean(axis=1))


class ZeroShot:
  DEFAULTS = dict(
      test='fashion_mnist:test',      # source spec of the labelled test images
      max_test=1000,
      image_size=0,                   # 0: the view size
      classes='fashion_mnist',        # class names: 'fashion_mnist' or a file, one per line
      templates=TEMPLATES,
      text_weights='pretrained',      # the text towers' weights: 'pretrained', 'random', a file
      batch_size=64,
      seed=0,
  )

  def __init__(self, options, config):
    self.options = options
    size = options.image_size or config.data.image_size
    self.images, self.labels, _ = labelled_images(options.test, config.data, options.max_test,
                                                  size)
    self.names = class_names(options.classes)

  def start(self, model) -> None:
    del model

  def evaluate(self, model) -> dict:
    o = self.options
    results = {}
    for alias, teacher in model.teachers.items():
      spec = teacher.spec
      if spec.text is None:
        continue
      text = class_embeddings(text_tower(spec, o.text_weights, o.seed), spec, self.names,
                              o.templates)
      predict = lambda fn: np.argmax(_normalise(
          batched(lambda x: fn(x)['embedding'], self.images, o.batch_size)) @ text.T, axis=-1)
      teacher_pred = predict(model.teacher(alias))
      out = {'teacher': float(np.mean(teacher_pred == self.labels))}
      if hasattr(model, 'as_teacher'):
        student_pred = predict(model.as_teacher(alias))
        out['student'] = float(np.mean(student_pred == self.labels))
        out['agreement'] = float(np.mean(student_pred == teacher_pred))
      results[alias] = out
    return {'images': len(self.labels), 'classes': len(self.names),
            'chance': 1 / len(self.names), 'accuracy': results}

  def write(self, results: dict, workdir: str) -> None:
    del workdir
    print(f'zero-shot ({results["images"]} images, {results["classes"]} classes, chance '
          f'{results["chance"]:.3f}):', flush=True)
    for alias, r in results['accuracy'].items():
      print(f'  {alias}: ' + ', '.join(f'{k} {v:.4f}' for k, v in r.items()), flush=True)
