"""A gs:// workdir: training, resume, evaluation, statistics and inference through etils.epath
and orbax, with the bucket faked by a local folder, and no plain os / open call on the workdir."""
import builtins
import json
import os

import fsspec
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from kivfm import config as config_lib, evals, inference, metrics, paths, stats, train
from kivfm.evals import report

WORKDIR = 'gs://bucket/runs/smoke'
SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     'configs', 'base.py') + ':smoke'


class FakeGcs(DirFileSystem):
  """fsspec 'gs' / 'gcs' filesystem whose objects gs://B/P are the files ROOT/B/P, listed as
  'B/P' as gcsfs lists them."""
  protocol = ('gs', 'gcs')
  root = ''

  def __init__(self, *args, **kwargs):
    super().__init__(path=self.root, fs=LocalFileSystem())

  def _join(self, path):
    if isinstance(path, str):
      path = path.removeprefix('gs://').removeprefix('gcs://')
    return super()._join(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """Local folder behind gs://: epath's fsspec backend and orbax's tensorstore kvstore both
  map gs://B/P to ROOT/B/P; any os/open call on a 'gs:' path fails the test."""
  root = tmp_path / 'gcs'
  root.mkdir()
  monkeypatch.setattr(FakeGcs, 'root', str(root))
  fsspec.register_implementation('gs', FakeGcs, clobber=True)
  fsspec.register_implementation('gcs', FakeGcs, clobber=True)
  FakeGcs.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
  build_kvstore_tspec = ts_utils.build_kvstore_tspec
  monkeypatch.setattr(ts_utils, 'build_kvstore_tspec', lambda directory, *args, **kwargs:
                      build_kvstore_tspec(str(directory).replace('gs://', f'{root}/'),
                                          *args, **kwargs))
  touched = []

  def guard(function):
    def guarded(path, *args, **kwargs):
      if isinstance(path, (str, os.PathLike)) and 'gs:' in os.fspath(path):
        touched.append((function.__name__, os.fspath(path)))
      return function(path, *args, **kwargs)
    return guarded

  for module, name in ((builtins, 'open'), (os, 'makedirs'), (os, 'mkdir'), (os, 'replace'),
                       (os, 'remove'), (os, 'listdir'), (os.path, 'exists'),
                       (os.path, 'isdir'), (os.path, 'abspath')):
    monkeypatch.setattr(module, name, guard(getattr(module, name)))
  monkeypatch.chdir(tmp_path)
  yield root
  FakeGcs.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not touched, f'plain os/open calls on the workdir: {touched}'
  assert not (tmp_path / 'gs:').exists()


class CurvesEvaluator:
  """Plug-in evaluator: the student's mean global-feature norm, and the loss curves as a PNG
  written into the workdir (as the inheritance report does)."""
  DEFAULTS = {}

  def __init__(self, options, config):
    self.options = options
    self.images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), np.uint8)

  def start(self, student):
    pass

  def evaluate(self, student):
    features = np.asarray(student.features(self.images)['cls'])
    return {'norm': float(np.linalg.norm(features, axis=-1).mean())}

  def write(self, results, workdir):
    report.plot_curves(paths.path(workdir) / 'metrics.jsonl',
                       paths.path(workdir) / 'eval' / 'curves.png')


def test_training_resume_evaluation_and_inference_in_a_bucket(bucket, monkeypatch):
  monkeypatch.setitem(evals.EVALUATORS, 'curves', CurvesEvaluator)
  config = config_lib.load(SMOKE)
  config.total_steps = 10
  config.evals.curves = config_lib.evaluator('curves', every=10)
  train.train_and_evaluate(config, WORKDIR)
  run_dir = bucket / 'bucket' / 'runs' / 'smoke'
  result = json.loads((run_dir / 'eval' / 'curves.json').read_text())
  assert result['norm'] > 0 and (run_dir / 'eval' / 'curves.png').read_bytes()[:4] == b'\x89PNG'
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['10']
  assert json.loads((run_dir / 'config.json').read_text())['total_steps'] == 10
  assert [r['step'] for r in metrics.read_jsonl(WORKDIR + '/metrics.jsonl')] == list(range(1, 11))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(run_dir / 'tensorboard'))

  config.total_steps = 14   # resume from the bucket's checkpoint
  train.train_and_evaluate(config, WORKDIR)
  records = metrics.read_jsonl(run_dir / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(1, 15))
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['10', '14']

  student = inference.load(WORKDIR)
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8)
  assert np.isfinite(np.asarray(student.features(images)['cls'])).all()


def test_statistics_and_eval_files_round_trip_through_the_bucket(bucket):
  feature_stats = stats.FeatureStats(3)
  feature_stats.update(np.arange(12.0).reshape(4, 3))
  config = config_lib.load(SMOKE)
  path = stats.stats_path(stats.stats_dir(config, WORKDIR), 'dino', 'cls')
  path.parent.mkdir(parents=True)
  feature_stats.save(path)
  assert (bucket / 'bucket/runs/smoke/teacher_stats/dino_cls.npz').exists()
  loaded = stats.FeatureStats.load(path)
  np.testing.assert_array_equal(loaded.mean, feature_stats.mean)
  paths.write_text_atomic(paths.path(WORKDIR) / 'note.txt', 'x')
  assert (bucket / 'bucket/runs/smoke/note.txt').read_text() == 'x'


def test_a_bucket_without_its_filesystem_package_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(fsspec, 'get_filesystem_class', lambda scheme: (_ for _ in ()).throw(
      ImportError('Please install gcsfs to access Google Storage')))
  with pytest.raises(config_lib.ConfigError, match='requirements-cloud.txt'):
    paths.path(WORKDIR)


def test_a_teacher_cache_in_a_bucket_is_a_clear_error():
  from kivfm import cache
  config = config_lib.load(SMOKE)
  config.teacher_cache = 'gs://bucket/cache'
  with pytest.raises(config_lib.ConfigError, match='gcsfuse'):
    cache.cache_dir(config, 'runs/x')
