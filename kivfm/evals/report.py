"""The inheritance report (evaluator 'report'): DIR/eval/report.json, curves.png, a table.

Measured on held-out real images (Fashion-MNIST test split from the Debian package, photos from
scikit-image / scikit-learn), never on the distillation stream:
  * kNN (k=20, cosine) and linear-probe accuracy of global features: student, every teacher and
    raw pixels, probes trained on the first `probe_train` train images, tested on the first
    `probe_test` test images;
  * top-1 agreement of the student through each classifier teacher's own head with that teacher;
  * saliency-mask IoU (threshold 0.5) of the student through each saliency head with the teacher;
  * per-teacher fidelity (cosine in the teacher's own space) before and after training, and the
    mean patch-feature norm of each teacher and of the student's prediction of it;
  * pictures: the first three principal components of the patch features of the student, each
    teacher and the student's prediction of each teacher, as RGB, on the offline photos.
Written as DIR/eval/report.json, report.md (tables + pictures), curves.png and pca.png.
"""
from __future__ import annotations

import io

import jax
import numpy as np
from PIL import Image

from kivfm import metrics, paths
from kivfm.data import offline
from kivfm.evals import agreement, fidelity, knn, linear_probe, segmentation


def _to_rgb(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, h, w] grey or [N, h, w, 3] -> uint8 [N, size, size, 3] (bilinear)."""
  out = []
  for image in images:
    pil = Image.fromarray(image).convert('RGB')
    out.append(np.asarray(pil.resize((size, size), Image.BILINEAR)))
  return np.stack(out)


def held_out_images(options, fashion_mnist_dir: str, size: int) -> dict:
  """{'train': (images, labels), 'test': (images, labels), 'photos': images} at `size`."""
  e = options
  train_x, train_y = offline.read_fashion_mnist(fashion_mnist_dir, 'train')
  test_x, test_y = offline.read_fashion_mnist(fashion_mnist_dir, 'test')
  photos = [image for _, image in offline.load_photos()]
  return {'train': (_to_rgb(train_x[:e.probe_train], size), train_y[:e.probe_train]),
          'test': (_to_rgb(test_x[:e.probe_test], size), test_y[:e.probe_test]),
          'photos': np.stack([_to_rgb(p[None], size)[0] for p in photos])}


def batched(fn, images: np.ndarray, batch: int) -> dict:
  """fn over fixed-size chunks (the last one padded, so one compiled shape), concatenated."""
  outs = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out = jax.device_get(fn(chunk))
    outs.append(jax.tree.map(lambda x: np.asarray(x, np.float32)[:batch - pad], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def fidelities(student, images: np.ndarray, batch: int, norms: dict | None = None) -> dict:
  """alias -> {'patches', 'cls'} cosine fidelity of the student's prediction of the teacher;
  `norms`, when given, receives alias -> mean patch-feature norm {'teacher', 'student'}."""
  out = {}
  for alias in student.teachers:
    want = batched(student.teacher(alias), images, batch)
    got = batched(student.as_teacher(alias), images, batch)
    out[alias] = {k: fidelity.cosine_fidelity(got[k], want[k]) for k in ('patches', 'cls')}
    if norms is not None:
      norms[alias] = {name: float(np.linalg.norm(x['patches'], axis=-1).mean())
                      for name, x in (('teacher', want), ('student', got))}
  return out


def pca_rgb(*patches: np.ndarray) -> list[np.ndarray]:
  """uint8 [N, h, w, 3] per array of patch features [N, h, w, D]: projected on the first three
  principal components of all of them together (so colours compare across the arrays), each
  scaled from its 1st to 99th percentile."""
  flat = np.concatenate([np.asarray(p, np.float64).reshape(-1, p.shape[-1]) for p in patches])
  centred = flat - flat.mean(axis=0)
  _, _, components = np.linalg.svd(centred, full_matrices=False)
  projected = centred @ components[:3].T
  largest = projected[np.abs(projected).argmax(axis=0), np.arange(projected.shape[1])]
  projected *= np.where(largest < 0, -1, 1)   # sign convention: the largest entry is positive
  lo, hi = np.percentile(projected, [1, 99], axis=0)
  rgb = np.clip((projected - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
  rgb = (np.pad(rgb, ((0, 0), (0, 3 - rgb.shape[1]))) * 255).round().astype(np.uint8)
  ends = np.cumsum([0] + [p[..., 0].size for p in patches])   # fewer than 3 channels: black
  return [rgb[a:b].reshape(*p.shape[:-1], 3) for p, a, b in zip(patches, ends, ends[1:])]


def pictures(student, images: np.ndarray, batch: int) -> dict:
  """name -> uint8 [N, h, w, 3] PCA pictures of the patch features of the student, and of each
  teacher ('<alias>') with the student's prediction of it ('student as <alias>') in the same
  colours (one PCA of both)."""
  patches = lambda fn: batched(lambda x: fn(x)['patches'], images, batch)
  out = {'student': pca_rgb(patches(student.features))[0]}
  for alias in student.teachers:
    out[alias], out[f'student as {alias}'] = pca_rgb(patches(student.teacher(alias)),
                                                     patches(student.as_teacher(alias)))
  return out


def _probes(train, test, train_y, test_y, k: int) -> dict:
  return {'knn': knn.knn_accuracy(train, train_y, test, test_y, k=k),
          'linear': linear_probe.linear_probe_accuracy(train, train_y, test, test_y)}


def evaluate(options, student, images: dict, held_out: np.ndarray, fidelity_before: dict) -> dict:
  """The report dict; `images` from `held_out_images`, `held_out` the images for the heads and
  fidelity (the same as for `fidelity_before`)."""
  b, k = options.batch_size, options.knn_k
  (train_x, train_y), (test_x, test_y) = images['train'], images['test']
  global_features = {'student': lambda x: student.features(x)['cls']}
  for alias in student.teachers:
    global_features[alias] = lambda x, t=student.teacher(alias): t(x)['cls']
  probes = {name: _probes(batched(fn, train_x, b), batched(fn, test_x, b), train_y, test_y, k)
            for name, fn in global_features.items()}
  pixels = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
  probes['raw_pixels'] = _probes(pixels(train_x), pixels(test_x), train_y, test_y, k)

  heads = {}
  for alias, teacher in student.teachers.items():
    outputs = teacher.spec.outputs
    if 'logits' in outputs:
      want = batched(lambda x: student.teacher(alias)(x)['logits'], held_out, b)
      got = batched(lambda x: student.as_teacher(alias)(x)['logits'], held_out, b)
      heads[f'top1_agreement/{alias}'] = agreement.top1_agreement(got, want)
    if 'saliency' in outputs:
      want = batched(lambda x: student.teacher(alias)(x)['saliency'], held_out, b)
      got = batched(lambda x: student.as_teacher(alias)(x)['saliency'], held_out, b)
      heads[f'saliency_iou/{alias}'] = segmentation.mean_binary_iou(got > 0.5, want > 0.5)
  norms = {}
  after = fidelities(student, held_out, b, norms)
  return {
      'probe_sizes': {'train': int(len(train_y)), 'test': int(len(test_y))},
      'held_out_images': int(len(held_out)),
      'probes': probes,
      'heads': heads,
      'fidelity': {a: {'before': fidelity_before[a], 'after': after[a]} for a in after},
      'feature_norms': norms,
  }


class InheritanceReport:
  """Probes, inherited heads and fidelity before (`start`) and after training (`evaluate`)."""

  DEFAULTS = dict(
      probe_train=2000,               # Fashion-MNIST train images for the kNN / linear probes
      probe_test=1000,                # Fashion-MNIST test images the probes are scored on
      knn_k=20,
      head_images=256,                # test images (+ the offline photos) for heads / fidelity
      pictures=6,                     # offline photos shown in pca.png
      batch_size=64,
  )

  def __init__(self, options, config):
    self.options = options
    self.images = held_out_images(options, config.data.fashion_mnist_dir, config.data.image_size)
    self.before = None
    self.pictures = {}

  def head_images(self) -> np.ndarray:
    test = self.images['test'][0][:self.options.head_images]
    return np.concatenate([test, self.images['photos']])

  def start(self, student) -> None:
    self.before = fidelities(student, self.head_images(), self.options.batch_size)

  def evaluate(self, student) -> dict:
    if self.before is None:
      raise RuntimeError('the inheritance report compares with the untrained student: call '
                         'start(student) before training')
    self.pictures = pictures(student, self.images['photos'][:self.options.pictures],
                             self.options.batch_size)
    return evaluate(self.options, student, self.images, self.head_images(), self.before)

  def write(self, results: dict, workdir: str) -> None:
    directory = paths.path(workdir) / 'eval'
    plot_curves(paths.path(workdir) / 'metrics.jsonl', directory / 'curves.png')
    images = self.images['photos'][:self.options.pictures]
    (directory / 'pca.png').write_bytes(picture_grid(images, self.pictures))
    paths.write_text_atomic(directory / 'report.md', markdown(results, list(self.pictures)))
    print(table(results), f'\n(report.md, curves and pictures in {directory})', flush=True)


def table(report: dict) -> str:
  """A short plain-text summary for the terminal."""
  lines = [f'{"features":<14}{"kNN":>8}{"linear":>9}']
  for name, acc in report['probes'].items():
    lines.append(f'{name:<14}{acc["knn"]:>8.3f}{acc["linear"]:>9.3f}')
  for name, value in report['heads'].items():
    lines.append(f'{name:<30}{value:>8.3f}')
  for alias, f in report['fidelity'].items():
    lines.append(f'fidelity/{alias:<20} patches {f["before"]["patches"]:.3f} -> '
                 f'{f["after"]["patches"]:.3f}   cls {f["before"]["cls"]:.3f} -> '
                 f'{f["after"]["cls"]:.3f}')
  return '\n'.join(lines)


def markdown(report: dict, picture_names: list[str]) -> str:
  """The report as Markdown: tables, then the curves and the PCA pictures."""
  lines = ['# Inheritance report', '',
           f'Probes: {report["probe_sizes"]["train"]} train / {report["probe_sizes"]["test"]} '
           f'test images; heads, fidelity and norms: {report["held_out_images"]} held-out images.',
           '', '| features | kNN | linear probe |', '|---|---|---|']
  lines += [f'| {name} | {acc["knn"]:.3f} | {acc["linear"]:.3f} |'
            for name, acc in report['probes'].items()]
  lines += ['', '| through the student | value |', '|---|---|']
  lines += [f'| {name} | {value:.3f} |' for name, value in report['heads'].items()]
  lines += ['', '| teacher | fidelity patches (before -> after) | fidelity global | '
            'patch norm: teacher / student |', '|---|---|---|---|']
  for alias, f in report['fidelity'].items():
    n = report['feature_norms'][alias]
    lines.append(f'| {alias} | {f["before"]["patches"]:.3f} -> {f["after"]["patches"]:.3f} | '
                 f'{f["before"]["cls"]:.3f} -> {f["after"]["cls"]:.3f} | '
                 f'{n["teacher"]:.3g} / {n["student"]:.3g} |')
  lines += ['', '![training curves](curves.png)', '',
            'First three principal components of the patch features (columns: image, '
            + ', '.join(picture_names) + '):', '', '![PCA of patch features](pca.png)', '']
  return '\n'.join(lines)


def picture_grid(images: np.ndarray, pictures: dict, cell: int = 96) -> bytes:
  """PNG: one row per image, columns = the image and each PCA picture (nearest upsampling)."""
  resize = lambda x, method: np.asarray(Image.fromarray(x).resize((cell, cell), method))
  rows = [np.concatenate([resize(image, Image.BILINEAR)] +
                         [resize(pictures[name][i], Image.NEAREST) for name in pictures], axis=1)
          for i, image in enumerate(images)]
  buffer = io.BytesIO()
  Image.fromarray(np.concatenate(rows, axis=0)).save(buffer, 'PNG')
  return buffer.getvalue()


def png_bytes(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  return buffer.getvalue()


def plot_curves(metrics_path, out_path) -> None:
  """Loss, per-teacher loss and fidelity over steps -> PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  records = metrics.read_jsonl(metrics_path)
  steps = [r['step'] for r in records]
  aliases = sorted(k.split('/', 1)[1] for k in records[0] if k.startswith('loss/'))
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  axes[0].plot(steps, [r['loss'] for r in records])
  axes[0].set(title='total loss', xlabel='step')
  for alias in aliases:
    axes[1].plot(steps, [r[f'loss/{alias}'] for r in records], label=alias)
    axes[2].plot(steps, [r[f'fidelity/{alias}'] for r in records], label=alias)
  axes[1].set(title='per-teacher loss', xlabel='step')
  axes[2].set(title='fidelity (patch cosine, teacher space)', xlabel='step')
  for ax in axes[1:]:
    ax.legend()
  fig.tight_layout()
  paths.path(out_path).write_bytes(png_bytes(fig))
  plt.close(fig)
