"""The inheritance report (evaluator 'report'): DIR/eval/report.json, curves.png, a table.

Measured on held-out real images (Fashion-MNIST test split from the Debian package, photos from
scikit-image / scikit-learn), never on the distillation stream:
  * kNN (k=20, cosine) and linear-probe accuracy of global features: student, every teacher and
    raw pixels (the 28 x 28 images as they are), probes trained on the first `probe_train` train
    images, tested on the first `probe_test` test images;
  * top-1 agreement of the student through each classifier teacher's own head with that teacher,
    and saliency-mask IoU (threshold 0.5) through each saliency head, on the Fashion-MNIST test
    images and (suffix '_photos') on the photos;
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
from flax import nnx
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
  """{'train': (images, labels), 'test': (images, labels), 'photos': images} at `size`, and
  'pixels': (train, test) the Fashion-MNIST images as they are (28 x 28 grey)."""
  e = options
  train_x, train_y = offline.read_fashion_mnist(fashion_mnist_dir, 'train')
  test_x, test_y = offline.read_fashion_mnist(fashion_mnist_dir, 'test')
  photos = [image for _, image in offline.load_photos()]
  return {'train': (_to_rgb(train_x[:e.probe_train], size), train_y[:e.probe_train]),
          'test': (_to_rgb(test_x[:e.probe_test], size), test_y[:e.probe_test]),
          'photos': np.stack([_to_rgb(p[None], size)[0] for p in photos]),
          'pixels': (train_x[:e.probe_train], test_x[:e.probe_test])}


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


def fidelity_of(predicted: dict, teachers: dict, norms: dict | None = None) -> dict:
  """alias -> {'patches', 'cls'} cosine fidelity of the student's predictions (`predicted`, as
  from `Inherited.predict`) to the teachers' outputs (`teachers`: alias -> outputs); `norms`,
  when given, receives alias -> mean patch-feature norm {'teacher', 'student'}."""
  out = {}
  for alias, want in teachers.items():
    got = predicted[alias]
    out[alias] = {k: fidelity.cosine_fidelity(got[k], want[k]) for k in ('patches', 'cls')}
    if norms is not None:
      norms[alias] = {name: float(np.linalg.norm(x['patches'], axis=-1).mean())
                      for name, x in (('teacher', want), ('student', got))}
  return out


def teacher_outputs(student, images: np.ndarray, batch: int) -> dict:
  """alias -> everything teacher `alias` outputs on `images`."""
  return {alias: batched(student.teacher(alias), images, batch) for alias in student.teachers}


def fidelities(student, images: np.ndarray, batch: int, norms: dict | None = None) -> dict:
  """`fidelity_of` on `images`, running the student and the teachers."""
  return fidelity_of(batched(student.predict, images, batch),
                     teacher_outputs(student, images, batch), norms)


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


def pictures_of(predicted: dict, teachers: dict) -> dict:
  """name -> uint8 [N, h, w, 3] PCA pictures of the patch features of the student, and of each
  teacher ('<alias>') with the student's prediction of it ('student as <alias>') in the same
  colours (one PCA of both). `predicted` as from `Inherited.predict`, `teachers`: alias ->
  outputs, on the same images."""
  out = {'student': pca_rgb(predicted['features']['patches'])[0]}
  for alias, want in teachers.items():
    out[alias], out[f'student as {alias}'] = pca_rgb(want['patches'], predicted[alias]['patches'])
  return out


def pictures(student, images: np.ndarray, batch: int) -> dict:
  """`pictures_of` on `images`, running the student and the teachers."""
  return pictures_of(batched(student.predict, images, batch),
                     teacher_outputs(student, images, batch))


@nnx.jit
def _global(teacher, images):   # jitted whole, so the teacher's heads are never computed
  return teacher(images)['cls']


def _probes(train, test, train_y, test_y, k: int) -> dict:
  return {'knn': knn.knn_accuracy(train, train_y, test, test_y, k=k),
          'linear': linear_probe.linear_probe_accuracy(train, train_y, test, test_y)}


def _rows(tree, rows):
  return jax.tree.map(lambda x: x[rows], tree)


def evaluate(options, student_train: np.ndarray, predicted: dict, teachers: dict, labels: dict,
             fixed_probes: dict, head_rows: np.ndarray, fidelity_before: dict) -> dict:
  """The report dict from the models' outputs on the held-out images: `student_train` the
  student's global features on the probe train images; `predicted` (`Inherited.predict`) and
  `teachers` (alias -> outputs) on the evaluation images, whose first `probe_test` rows are the
  probe test images (`labels`: 'train', 'test') and `head_rows` the rows for the heads and
  fidelity (the same as for `fidelity_before`); `fixed_probes`: the teachers' and raw pixels'."""
  n = options.probe_test
  student = _probes(student_train, predicted['features']['cls'][:n], labels['train'],
                    labels['test'], options.knn_k)
  probes = {'student': student, **fixed_probes}
  heads = {}   # Fashion-MNIST test images, and separately the photos
  photo = head_rows >= len(labels['test'])
  for split, rows in (('', head_rows[~photo]), ('_photos', head_rows[photo])):
    got, wanted = _rows(predicted, rows), _rows(teachers, rows)
    for alias, want in wanted.items():
      if 'logits' in want:
        heads[f'top1_agreement{split}/{alias}'] = agreement.top1_agreement(got[alias]['logits'],
                                                                           want['logits'])
      if 'saliency' in want:
        heads[f'saliency_iou{split}/{alias}'] = segmentation.mean_binary_iou(
            got[alias]['saliency'] > 0.5, want['saliency'] > 0.5)
  predicted, teachers = _rows(predicted, head_rows), _rows(teachers, head_rows)
  norms = {}
  after = fidelity_of(predicted, teachers, norms)
  return {
      'probe_sizes': {'train': int(len(labels['train'])), 'test': int(len(labels['test']))},
      'held_out_images': int(len(head_rows)),
      'probes': probes,
      'heads': heads,
      'fidelity': {a: {'before': fidelity_before[a], 'after': after[a]} for a in after},
      'feature_norms': norms,
  }


def targets(report: dict, knowledge_base: str, options) -> dict:
  """The inheritance targets: name -> {'value', 'target', 'met'}. The student's kNN at least its
  knowledge base's (nothing lost), its linear probe at least the best teacher's, and every
  inherited head and fidelity (on the Fashion-MNIST test images) at least its option."""
  probes, teachers = report['probes'], list(report['fidelity'])
  rows = {'knn_vs_knowledge_base': (probes['student']['knn'], probes[knowledge_base]['knn']),
          'linear_vs_best_teacher': (probes['student']['linear'],
                                     max(probes[a]['linear'] for a in teachers))}
  option = {'top1_agreement': options.top1_target, 'saliency_iou': options.saliency_target}
  for name, value in report['heads'].items():
    if name.split('/')[0] in option:   # not the photos
      rows[name] = (value, option[name.split('/')[0]])
  for alias in teachers:
    for part in ('patches', 'cls'):
      rows[f'fidelity/{alias}/{part}'] = (report['fidelity'][alias]['after'][part],
                                          options.fidelity_target)
  return {name: {'value': value, 'target': target, 'met': bool(value >= target)}
          for name, (value, target) in rows.items()}


class InheritanceReport:
  """Probes, inherited heads and fidelity before (`start`) and after training (`evaluate`).

  The teachers are frozen: `start` runs them once over every held-out image and keeps what the
  report needs, so each `evaluate` runs only the student (once per image, every teacher's
  prediction from the same pass)."""

  DEFAULTS = dict(
      probe_train=2000,               # Fashion-MNIST train images for the kNN / linear probes
      probe_test=1000,                # Fashion-MNIST test images the probes are scored on
      knn_k=20,
      head_images=256,                # test images (+ the offline photos) for heads / fidelity
      pictures=6,                     # offline photos shown in pca.png
      batch_size=64,
      top1_target=0.6,                # targets (`targets`): classifier agreement,
      saliency_target=0.9,            # saliency IoU,
      fidelity_target=0.8,            # fidelity to every teacher, patches and global
  )

  def __init__(self, options, config):
    self.options = options
    self.knowledge_base = config.student.knowledge_base
    images = held_out_images(options, config.data.fashion_mnist_dir, config.data.image_size)
    (self.train_images, train_y), (test, test_y) = images['train'], images['test']
    self.labels = {'train': train_y, 'test': test_y}
    self.pixels = images['pixels']
    # Evaluation images: the probe test images, then the photos; heads and fidelity use the
    # first `head_images` test images and the photos.
    self.eval_images = np.concatenate([test, images['photos']])
    photos = len(test) + np.arange(len(images['photos']))
    self.head_rows = np.concatenate([np.arange(min(options.head_images, len(test))), photos])
    self.picture_rows = photos[:options.pictures]
    self.before = self.teachers = self.fixed_probes = None
    self.pictures = {}

  def head_images(self) -> np.ndarray:
    return self.eval_images[self.head_rows]

  def start(self, student) -> None:
    """Runs the teachers (and the raw-pixel probe) once, and measures the untrained student."""
    b, k = self.options.batch_size, self.options.knn_k
    train_y, test_y = self.labels['train'], self.labels['test']
    self.teachers = teacher_outputs(student, self.eval_images, b)
    self.fixed_probes = {
        alias: _probes(batched(lambda x, t=student.teachers[alias]: _global(t, x),
                               self.train_images, b), out['cls'][:len(test_y)], train_y, test_y, k)
        for alias, out in self.teachers.items()}
    pixels = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255.0
    self.fixed_probes['raw_pixels'] = _probes(*map(pixels, self.pixels), train_y, test_y, k)
    self.before = fidelity_of(batched(student.predict, self.head_images(), b),
                              _rows(self.teachers, self.head_rows))

  def evaluate(self, student) -> dict:
    if self.before is None:
      raise RuntimeError('the inheritance report compares with the untrained student: call '
                         'start(student) before training')
    b = self.options.batch_size
    student_train = batched(lambda x: student.features(x)['cls'], self.train_images, b)
    predicted = batched(student.predict, self.eval_images, b)
    self.pictures = pictures_of(_rows(predicted, self.picture_rows),
                                _rows(self.teachers, self.picture_rows))
    report = evaluate(self.options, student_train, predicted, self.teachers, self.labels,
                      self.fixed_probes, self.head_rows, self.before)
    return {**report, 'targets': targets(report, self.knowledge_base, self.options)}

  def write(self, results: dict, workdir: str) -> None:
    directory = paths.path(workdir) / 'eval'
    plot_curves(paths.path(workdir) / 'metrics.jsonl', directory / 'curves.png')
    images = self.eval_images[self.picture_rows]
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
  for name, t in report.get('targets', {}).items():
    lines.append(f'target {name:<30}{t["value"]:>8.3f} >= {t["target"]:.3f}  '
                 f'{"met" if t["met"] else "NOT met"}')
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
  if 'targets' in report:
    lines += ['', '| target | value | at least | met |', '|---|---|---|---|']
    lines += [f'| {name} | {t["value"]:.3f} | {t["target"]:.3f} | {"yes" if t["met"] else "no"} |'
              for name, t in report['targets'].items()]
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


def training_minutes(records: list[dict]) -> list[float]:
  """Cumulative training time (minutes, evaluation excluded) at each record of metrics.jsonl."""
  total, previous, out = 0.0, 0, []
  for r in records:
    total += r.get('step_time', 0.0) * (r['step'] - previous)
    previous = r['step']
    out.append(total / 60)
  return out


HELD_OUT_CURVES = ('probes/student/knn', 'probes/student/linear')


def plot_curves(metrics_path, out_path) -> None:
  """Loss, per-teacher loss, fidelity (and classifier agreement) on the training batches over
  steps -> PNG; with the report evaluated more than once (`every`), a fourth panel: its
  held-out numbers against training time."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  records = metrics.read_jsonl(metrics_path)
  steps = [r['step'] for r in records]
  aliases = sorted(k.split('/', 1)[1] for k in records[0] if k.startswith('loss/'))
  minutes = dict(zip(steps, training_minutes(records)))
  evaluated = [r for r in records if 'eval/report/probes/student/knn' in r]
  fig, axes = plt.subplots(1, 4 if len(evaluated) > 1 else 3,
                           figsize=(17 if len(evaluated) > 1 else 13, 3.6))
  axes[0].plot(steps, [r['loss'] for r in records])
  axes[0].set(title='total loss', xlabel='step')
  for alias in aliases:
    axes[1].plot(steps, [r[f'loss/{alias}'] for r in records], label=alias)
    axes[2].plot(steps, [r[f'fidelity/{alias}'] for r in records], label=alias)
    if f'head_agreement/{alias}' in records[-1]:   # distilled through its classifier
      window = min(25, len(records))                 # a batch is few images: a running mean
      agree = np.convolve([r.get(f'head_agreement/{alias}', np.nan) for r in records],
                          np.ones(window) / window, mode='valid')
      axes[2].plot(steps[window - 1:], agree, ':', label=f'{alias} top-1 agreement')
  axes[1].set(title='per-teacher loss', xlabel='step')
  axes[2].set(title='on the training batch: fidelity (patch cosine)', xlabel='step')
  if len(evaluated) > 1:
    keys = [k for k in evaluated[-1] if k.startswith('eval/report/') and (
        k.endswith(HELD_OUT_CURVES) or '/heads/' in k or k.endswith('/after/patches')
        or k.endswith('/after/cls'))]
    x = [minutes[r['step']] for r in evaluated]
    for key in keys:
      name = key.removeprefix('eval/report/').replace('/after', '').replace('probes/', '')
      axes[3].plot(x, [r.get(key, float('nan')) for r in evaluated], marker='.', label=name)
    axes[3].set(title='held-out report', xlabel='training time (min)')
    axes[3].legend(fontsize=6)
  for ax in axes[1:3]:
    ax.legend()
  fig.tight_layout()
  paths.path(out_path).write_bytes(png_bytes(fig))
  plt.close(fig)
