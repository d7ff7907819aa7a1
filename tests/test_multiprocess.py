"""Several processes on loopback (launch/local.sh --processes=2 --cpu-devices=4) form one
8-device JAX cluster: training equals the single-process 8-device run, resumes, stops together
on one process's SIGTERM; teacher statistics are computed across processes."""
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from kivfm import metrics
from test_train import main_cmd

REPO_ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
  return 20000 + (os.getpid() * 7 + int(time.time())) % 20000


def local_sh(workdir, *overrides, processes=2):
  return ['bash', str(REPO_ROOT / 'launch' / 'local.sh'), f'--processes={processes}',
          '--cpu-devices=4', f'--port={_port()}', 'configs/base.py:smoke', str(workdir),
          '--config.progress=none', *overrides]


def run(cmd):
  result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


def losses(workdir):
  return [r['loss'] for r in metrics.read_jsonl(Path(workdir) / 'metrics.jsonl')]


def test_two_processes_train_like_one_stop_together_and_resume(tmp_path):
  """SIGTERM to process 1 alone: both write one checkpoint at the same step and exit 143; the
  resumed run ends with the losses of the uninterrupted single-process 8-device run."""
  steps = '--config.total_steps=60'
  run(main_cmd(tmp_path / 'one', steps))
  two = tmp_path / 'two'
  proc = subprocess.Popen(local_sh(two, steps), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  log = two / 'metrics.jsonl'
  t0 = time.time()
  while not (log.exists() and metrics.read_jsonl(log)):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() - t0 < 300, 'timed out'
    time.sleep(0.05)
  worker = subprocess.run(['pgrep', '-f', f'kivfm.main.*--workdir={two} .*process_id=1'],
                          capture_output=True, text=True).stdout.split()
  assert len(worker) == 1, worker
  os.kill(int(worker[0]), signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'over 8 devices (2 processes)' in stderr
  stopped = int(max(os.listdir(two / 'checkpoints'), key=int))
  assert stopped < 60, 'stopped too late'
  assert stderr.count(f'preempted at step {stopped};') == 2   # both processes, the same step
  assert metrics.read_jsonl(log)[-1]['step'] == stopped

  assert f'resumed from step {stopped}' in run(local_sh(two, steps))
  records = metrics.read_jsonl(log)
  assert [r['step'] for r in records] == list(range(1, 61))   # written once, by process 0
  assert '60' in os.listdir(two / 'checkpoints')
  np.testing.assert_allclose([r['loss'] for r in records], losses(tmp_path / 'one'), rtol=1e-5)


def test_teacher_statistics_across_two_processes_equal_one(tmp_path):
  """kivfm.compute_stats on two processes reads the same global batches as one process and
  merges exactly: the global-vector statistics agree to float64 rounding (patch tokens are
  subsampled per process, so only their count is compared)."""
  from kivfm import compute_stats, config as config_lib
  from kivfm.stats import FeatureStats, stats_path
  name = 'configs/ablations/normalizer.py:norm=phi_s,smoke'
  expected = compute_stats.compute(config_lib.load(name), str(tmp_path / 'one'), batches=3,
                                   tokens_per_image=8)
  port = _port()
  env = {**os.environ, 'XLA_FLAGS': os.environ['XLA_FLAGS'].replace(
      'device_count=8', 'device_count=4')}
  procs = [subprocess.Popen(
      ['python', '-m', 'kivfm.compute_stats', f'--config={name}', f'--workdir={tmp_path / "two"}',
       '--batches=3', '--tokens_per_image=8', '--config.distributed.enabled=True',
       f'--config.distributed.coordinator_address=127.0.0.1:{port}',
       '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'],
      cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for proc in procs:
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
  for alias, kinds in expected.items():
    got = FeatureStats.load(stats_path(tmp_path / 'two' / 'teacher_stats', alias, 'cls'))
    assert got.count == kinds['cls'].count == 3 * 8
    np.testing.assert_allclose(got.mean, kinds['cls'].mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.cov, kinds['cls'].cov, rtol=1e-9, atol=1e-12)
    got = FeatureStats.load(stats_path(tmp_path / 'two' / 'teacher_stats', alias, 'patches'))
    assert got.count == kinds['patches'].count
