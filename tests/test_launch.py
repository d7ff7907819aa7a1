"""launch/*.sh: shellcheck clean; the exact commands of every --dry-run; and the real code paths
against fakes placed first on PATH: a fake `srun` (one task per local id) and a fake `gcloud`
that records its calls, answers scripted queued-resource states and runs the worker commands in
a local folder standing for the worker's home, where a fake `python` records each launch."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH = REPO_ROOT / 'launch'


def _env(tmp_path, **extra):
  """The test environment without anything a launcher reads from a real cluster."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'XLA_', 'NCCL_'))}
  env['TMPDIR'] = str(tmp_path)
  env.update(extra)
  return env


def _launch(script, *args, env, cwd=None, timeout=30):
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env=env, cwd=cwd or REPO_ROOT, timeout=timeout)


def _lines(result):
  assert result.returncode == 0, result.stderr
  return result.stdout.replace(str(REPO_ROOT), '<repo>').splitlines()


def _executable(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


# ------------------------------------------------------------------------------ shellcheck

def test_the_launchers_are_the_expected_ones():
  assert sorted(p.name for p in LAUNCH.glob('*.sh')) == ['gpu_slurm.sh', 'local.sh', 'print_command.sh', 'tpu_pod.sh']


@pytest.mark.parametrize('script', sorted(p.name for p in LAUNCH.glob('*.sh')))
def test_shellcheck(script):
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed (CI installs it: apt-get install shellcheck)')
  result = subprocess.run(['shellcheck', str(LAUNCH / script)], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------ local.sh

def test_local_dry_run_one_process(tmp_path):
  out = _launch('local.sh', '--dry-run', 'configs/base.py:smoke', 'runs/x',
                '--config.data.tfds_name=a b', env=_env(tmp_path))
  assert _lines(out) == ['python -m kivfm.main --config=configs/base.py:smoke --workdir=runs/x '
                         "--config.data.tfds_name='a b'"]


def test_local_dry_run_two_processes_keeps_user_xla_flags(tmp_path):
  out = _launch('local.sh', '--dry-run', '--processes=2', '--cpu-devices=4', '--port=999',
                'configs/base.py:smoke', 'runs/x', '--config.total_steps=4',
                env=_env(tmp_path, XLA_FLAGS='--xla_a=1 --xla_force_host_platform_device_count=8'))
  command = ('python -m kivfm.main --config=configs/base.py:smoke --workdir=runs/x '
             '--config.distributed.enabled=True '
             '--config.distributed.coordinator_address=127.0.0.1:999 '
             '--config.distributed.num_processes=2 --config.distributed.process_id={} '
             '--config.total_steps=4 &')
  assert _lines(out) == [
      'export JAX_PLATFORMS=cpu',
      "export XLA_FLAGS='--xla_a=1 --xla_force_host_platform_device_count=4'",
      command.format(0), command.format(1)]


def test_local_dry_run_one_process_per_gpu(tmp_path):
  out = _lines(_launch('local.sh', '--dry-run', '--processes=2', '--gpus-per-process=2', 'c', 'w',
                       env=_env(tmp_path)))
  assert [line.split(' --config.distributed.')[-1] for line in out] == [
      'local_device_ids=0,1 &', 'local_device_ids=2,3 &']


@pytest.mark.parametrize('args, message', [
    (['--processes=0', 'c', 'w'], "--processes must be a positive integer, got '0'"),
    (['--cpu-devices=2', '--gpus-per-process=1', 'c', 'w'], 'exclude each other'),
    (['--nodes=2', 'c', 'w'], "unknown option '--nodes=2'"),
])
def test_local_names_the_offending_argument(tmp_path, args, message):
  out = _launch('local.sh', '--dry-run', *args, env=_env(tmp_path))
  assert out.returncode == 2 and message in out.stderr


# ------------------------------------------------------------------------------ gpu_slurm.sh

def test_gpu_slurm_dry_run_one_process_per_node(tmp_path):
  out = _launch('gpu_slurm.sh', '--dry-run', '--nodes=2', '--gpus-per-node=4',
                'configs/demo.py', '/shared/runs/x', '--config.total_steps=10',
                env=_env(tmp_path))
  assert _lines(out) == [
      'cd <repo>',
      'export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true',
      'srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 '
      'python -m kivfm.main --config=configs/demo.py --workdir=/shared/runs/x '
      '--config.distributed.enabled=True --config.total_steps=10 '
      '--config.distributed.local_device_ids=0,1,2,3',
  ]


def test_gpu_slurm_dry_run_one_process_per_gpu(tmp_path):
  out = _launch('gpu_slurm.sh', '--dry-run', '--mode=gpu', '--nodes=2', '--gpus-per-node=4',
                'configs/demo.py', '/shared/runs/x', '--config.mesh.shape=(-1,1,1)',
                env=_env(tmp_path, XLA_FLAGS='--xla_gpu_enable_command_buffer='))
  assert _lines(out) == [
      'cd <repo>',
      "export XLA_FLAGS='--xla_gpu_enable_command_buffer= "
      "--xla_gpu_enable_latency_hiding_scheduler=true'",
      'srun --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 '
      'bash -c \'exec "$@" --config.distributed.local_device_ids="$SLURM_LOCALID"\' bash '
      'python -m kivfm.main --config=configs/demo.py --workdir=/shared/runs/x '
      "--config.distributed.enabled=True --config.mesh.shape='(-1,1,1)'",
  ]


def test_gpu_slurm_reads_the_allocation_and_keeps_user_xla_flags(tmp_path):
  env = _env(tmp_path, SLURM_JOB_NUM_NODES='3', SLURM_GPUS_PER_NODE='a100:8',
             XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=false')
  out = _lines(_launch('gpu_slurm.sh', '--dry-run', 'c.py', 'w', env=env))
  assert out[1] == 'export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false'
  assert out[2].startswith('srun --nodes=3 --ntasks-per-node=1 --gpus-per-node=8 ')
  assert out[2].endswith(' --config.distributed.local_device_ids=0,1,2,3,4,5,6,7')


@pytest.mark.parametrize('args, message', [
    (['--mode=rank', '--nodes=1', '--gpus-per-node=1', 'c', 'w'], "--mode must be node or gpu, got 'rank'"),
    (['--nodes=1', '--gpus-per-node=1', '--gpus=2', 'c', 'w'], "unknown option '--gpus=2'"),
    (['--gpus-per-node=1', 'c', 'w'], '--nodes=N is needed outside a SLURM allocation'),
    (['--nodes=1', 'c', 'w'], '--gpus-per-node=N is needed'),
    (['--nodes=two', '--gpus-per-node=1', 'c', 'w'], "--nodes must be a positive integer, got 'two'"),
    (['--nodes=1', '--gpus-per-node=1', 'c'], 'missing CONFIG and WORKDIR'),
    (['--nodes=1', '--gpus-per-node=1', 'c', 'w', '--config.distributed.local_device_ids=1'],
     "'--config.distributed.local_device_ids=1': gpu_slurm.sh sets the local devices itself"),
])
def test_gpu_slurm_names_the_offending_argument(tmp_path, args, message):
  out = _launch('gpu_slurm.sh', '--dry-run', *args, env=_env(tmp_path))
  assert out.returncode == 2
  assert message in out.stderr


@pytest.mark.parametrize('mode, expected_ids', [('node', ['0,1,2']), ('gpu', ['0', '1', '2'])])
def test_gpu_slurm_gives_each_task_its_devices(tmp_path, mode, expected_ids):
  """The real srun line through a fake srun (each task of one node, SLURM_LOCALID set) and a
  fake python printing its arguments: the per-task shell expands SLURM_LOCALID, overrides with
  shell characters arrive intact, XLA_FLAGS reaches the tasks."""
  bin_dir = tmp_path / 'bin'
  _executable(bin_dir / 'srun', '#!/usr/bin/env bash\n'
              'tasks=1\n'
              'while [[ $1 == --* ]]; do\n'
              '  case $1 in --ntasks-per-node=*) tasks=${1#*=} ;; esac\n'
              '  shift\n'
              'done\n'
              'for ((i = 0; i < tasks; i++)); do SLURM_LOCALID=$i "$@" || exit; done\n')
  _executable(bin_dir / 'python', '#!/usr/bin/env bash\n'
              'echo "task=$SLURM_LOCALID cwd=$PWD xla=$XLA_FLAGS"\n'
              'printf "arg=%s\\n" "$@"\n')
  env = _env(tmp_path, PATH=f'{bin_dir}:{os.environ["PATH"]}')
  out = _launch('gpu_slurm.sh', f'--mode={mode}', '--nodes=1', '--gpus-per-node=3',
                'configs/demo.py', "/runs/it's x", '--config.mesh.shape=(-1,1,1)', env=env,
                cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  tasks = out.stdout.split('task=')[1:]
  assert len(tasks) == len(expected_ids)
  for i, (task, ids) in enumerate(zip(tasks, expected_ids)):
    lines = task.splitlines()
    assert lines[0] == (f'{i} cwd={REPO_ROOT} '
                        'xla=--xla_gpu_enable_latency_hiding_scheduler=true')
    assert lines[1:] == ['arg=-m', 'arg=kivfm.main', 'arg=--config=configs/demo.py',
                         "arg=--workdir=/runs/it's x", 'arg=--config.distributed.enabled=True',
                         'arg=--config.mesh.shape=(-1,1,1)',
                         f'arg=--config.distributed.local_device_ids={ids}']


# ------------------------------------------------------------------------------ tpu_pod.sh

TPU = ['--name=kpu', '--zone=us-central2-b', '--project=proj']
LOC = '--zone=us-central2-b --project=proj'
SSH = f'gcloud compute tpus tpu-vm ssh kpu {LOC}'
DESCRIBE = f"gcloud compute tpus queued-resources describe kpu-qr {LOC} --format='value(state.state)'"
CREATE = (f'gcloud compute tpus queued-resources create kpu-qr --node-id=kpu '
          f'--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base {LOC}')
DELETE = f'gcloud compute tpus queued-resources delete kpu-qr {LOC} --force --quiet'
SLICE = ['--accelerator-type=v4-32', '--runtime-version=tpu-ubuntu2204-base']
JAX = re.search(r'^jax==(\S+)$', (REPO_ROOT / 'requirements.txt').read_text(), re.M).group(1)
REQUIREMENTS = '-r requirements.txt' + (' -r requirements-cloud.txt'
                                        if (REPO_ROOT / 'requirements-cloud.txt').exists() else '')
SETUP = ('cd "$HOME/kivfm" && python3 -c \'\\\'\'import sys; assert sys.version_info >= (3, 11), '
         '"kivfm needs Python >= 3.11 (--python=BIN)"\'\\\'\' && python3 -m venv "$HOME/kivfm-venv" '
         f'&& "$HOME/kivfm-venv"/bin/pip install {REQUIREMENTS} "jax[tpu]=={JAX}" '
         '&& "$HOME/kivfm-venv"/bin/pip install --no-deps -r requirements-assets.txt\'')
GIT_INSTALL = (f'{SSH} --worker=all --command=\'rm -rf "$HOME/kivfm" && git clone --depth=1 '
               '--branch=dev https://example.com/kivfm.git "$HOME/kivfm" && ' + SETUP)
LAUNCH_CMD = (
    f'{SSH} --worker=all --command=\'if [ -f "$HOME/kivfm_run"/pid ] && '
    '[ ! -f "$HOME/kivfm_run"/exit_code ] && kill -0 "$(cat "$HOME/kivfm_run"/pid)" 2>/dev/null; '
    "then echo '\\''kivfm is already running here'\\'' >&2; exit 1; fi; "
    'mkdir -p "$HOME/kivfm_run" && rm -f "$HOME/kivfm_run"/exit_code && cd "$HOME/kivfm" && '
    "{ nohup bash -c '\\''\"$HOME/kivfm-venv\"/bin/python -m kivfm.main --config=configs/base.py "
    '--workdir=gs://bucket/kpu --config.distributed.enabled=True --config.total_steps=100; '
    "echo $? > \"$HOME/kivfm_run\"/exit_code'\\'' > \"$HOME/kivfm_run\"/train.log 2>&1 "
    '< /dev/null & echo $! > "$HOME/kivfm_run"/pid; }\'')
PROBE = (f'{SSH} --worker=0 --command=\'if [ -f "$HOME/kivfm_run"/exit_code ]; then echo "exit '
         '$(cat "$HOME/kivfm_run"/exit_code)"; elif [ -f "$HOME/kivfm_run"/pid ] && kill -0 '
         '"$(cat "$HOME/kivfm_run"/pid)" 2>/dev/null; then echo running; else echo idle; fi\'')
RUN = ['configs/base.py', 'gs://bucket/kpu', '--config.total_steps=100']


def _follow(worker):
  return (f'{SSH} --worker={worker} --command=\'tail -n +1 --pid="$(cat "$HOME/kivfm_run"/pid)" '
          '-F "$HOME/kivfm_run"/train.log\'')


def test_tpu_dry_run_create_spot_and_queued(tmp_path):
  wait = ['# every 60s until the state is ACTIVE:', DESCRIBE]
  spot = _launch('tpu_pod.sh', 'create', *TPU, *SLICE, '--spot', '--dry-run', env=_env(tmp_path))
  assert _lines(spot) == [CREATE + ' --spot', *wait]
  queued = _launch('tpu_pod.sh', 'create', *TPU, *SLICE, '--dry-run', env=_env(tmp_path))
  assert _lines(queued) == [CREATE, *wait]


def test_tpu_dry_run_install_copies_the_checkout_or_clones(tmp_path):
  copy = _lines(_launch('tpu_pod.sh', 'install', *TPU, '--dry-run', env=_env(tmp_path)))
  tarball = re.escape(str(tmp_path)) + r'/tmp\.\w+/kivfm-src\.tgz'
  assert re.fullmatch(f'tar -czf {tarball} --exclude=./.git --exclude=./runs '
                      r'--exclude=./workdirs --exclude=./.venv --exclude=__pycache__ -C <repo> \.',
                      copy[0])
  assert re.fullmatch(f'gcloud compute tpus tpu-vm scp {tarball} kpu: {LOC} --worker=all', copy[1])
  assert copy[2:] == [
      f'{SSH} --worker=all --command=\'rm -rf "$HOME/kivfm" && mkdir -p "$HOME/kivfm" && '
      'tar -xzf "$HOME/kivfm-src.tgz" -C "$HOME/kivfm" && rm "$HOME/kivfm-src.tgz" && ' + SETUP]
  clone = _launch('tpu_pod.sh', 'install', *TPU, '--git=https://example.com/kivfm.git',
                  '--branch=dev', '--dry-run', env=_env(tmp_path))
  assert _lines(clone) == [GIT_INSTALL]


def test_tpu_dry_run_run_logs_status_delete(tmp_path):
  env = _env(tmp_path)
  assert _lines(_launch('tpu_pod.sh', 'run', *TPU, '--dry-run', *RUN, env=env)) == [
      LAUNCH_CMD, _follow(0)]
  assert _lines(_launch('tpu_pod.sh', 'logs', *TPU, '--worker=3', '--dry-run', env=env)) == [
      _follow(3)]
  assert _lines(_launch('tpu_pod.sh', 'status', *TPU, '--dry-run', env=env)) == [DESCRIBE]
  assert _lines(_launch('tpu_pod.sh', 'delete', *TPU, '--dry-run', env=env)) == [DELETE]


def test_tpu_dry_run_watch_prints_the_recovery_cycle(tmp_path):
  out = _launch('tpu_pod.sh', 'watch', *TPU, *SLICE, '--spot', '--poll=30',
                '--git=https://example.com/kivfm.git', '--branch=dev', '--dry-run', *RUN,
                env=_env(tmp_path))
  assert _lines(out) == [
      "# every 30s, the queued resource's state:", DESCRIBE,
      '# SUSPENDED or FAILED: delete it; then (also when absent) recreate it:',
      DELETE, CREATE + ' --spot',
      '# ACTIVE after a (re)creation: install', GIT_INSTALL,
      "# ACTIVE: worker 0's run state (running, idle, exit CODE):", PROBE,
      '# idle, or exit 143 (SIGTERM): launch; exit 0: done; other exit codes: stop', LAUNCH_CMD]


@pytest.mark.parametrize('args, message', [
    (['--dry-run', 'status'], "unknown command '--dry-run' (the command comes first"),
    (['start', *TPU], "unknown command 'start'"),
    (['status', '--zone=z'], 'missing --name=NAME'),
    (['status', '--name=n', '--zone=z', '--region=r'], "unknown option '--region=r'"),
    (['create', '--name=n', '--zone=z', '--runtime-version=v'], 'create needs --accelerator-type'),
    (['run', '--name=n', '--zone=z', 'configs/base.py'], 'run needs CONFIG and WORKDIR'),
    (['logs', '--name=n', '--zone=z', '--worker=all'], "--worker must be a worker number, got 'all'"),
    (['delete', '--name=n', '--zone=z', 'now'], "unexpected argument 'now'"),
])
def test_tpu_names_the_offending_argument(tmp_path, args, message):
  out = _launch('tpu_pod.sh', *args, env=_env(tmp_path))
  assert out.returncode == 2
  assert message in out.stderr


FAKE_GCLOUD = '''#!{python}
"""Fake gcloud: records argv; scripted queued-resource states; runs worker commands locally."""
import ctypes, json, os, shutil, subprocess, sys
fake = os.environ['FAKE_GCLOUD_DIR']
home = os.path.join(fake, 'home')
args = sys.argv[1:]
with open(os.path.join(fake, 'calls.jsonl'), 'a') as f:
  f.write(json.dumps(args) + '\\n')
verb = ' '.join(args[:4])
if verb == 'compute tpus queued-resources describe':
  with open(os.path.join(fake, 'states')) as f:
    states = f.read().split()
  if not states:
    sys.exit('fake gcloud: no scripted state left')
  with open(os.path.join(fake, 'states'), 'w') as f:
    f.write('\\n'.join(states[1:]))
  if states[0] == 'ABSENT':
    sys.exit('ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found')
  print(states[0])
elif verb == 'compute tpus queued-resources create':   # a new slice: fresh worker disks
  shutil.rmtree(os.path.join(home, 'kivfm_run'), ignore_errors=True)
elif verb == 'compute tpus tpu-vm ssh':
  command = [a for a in args if a.startswith('--command=')][0][len('--command='):]
  if 'pip install' in command:   # install: recorded only
    sys.exit(0)
  # The detached run is re-parented here and waited for: it ends before the next poll.
  ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
  code = subprocess.run(['bash', '-c', command], cwd=home, env=dict(os.environ, HOME=home)).returncode
  while True:
    try:
      os.wait()
    except ChildProcessError:
      break
  sys.exit(code)
'''

FAKE_PYTHON = '''#!/usr/bin/env bash
# Fake kivfm run: prints where and with what it ran, exits with the next scripted code.
echo "cwd=$PWD"
printf 'arg=%s\\n' "$@"
printf '%s\\n' "$*" >> "$HOME/launches"
code=$(head -n 1 "$HOME/exit_codes")
sed -i 1d "$HOME/exit_codes"
exit "$code"
'''


@pytest.fixture
def fake_cloud(tmp_path):
  """(env, fake dir): gcloud first on PATH, a worker home with a checkout and a fake python."""
  fake = tmp_path / 'fake'
  _executable(fake / 'bin' / 'gcloud', FAKE_GCLOUD.replace('{python}', sys.executable))
  _executable(fake / 'home' / 'kivfm-venv' / 'bin' / 'python', FAKE_PYTHON)
  (fake / 'home' / 'kivfm').mkdir()
  env = _env(tmp_path, FAKE_GCLOUD_DIR=str(fake), PATH=f'{fake / "bin"}:{os.environ["PATH"]}')

  def script(states=(), exit_codes=()):
    (fake / 'states').write_text('\n'.join(states))
    (fake / 'home' / 'exit_codes').write_text(''.join(f'{c}\n' for c in exit_codes))

  return env, fake, script


def _calls(fake):
  """The recorded gcloud calls, the ssh ones named by what their command does."""
  names = []
  for line in (fake / 'calls.jsonl').read_text().splitlines():
    args = json.loads(line)
    if args[2] == 'queued-resources':
      names.append(args[3])
      assert args[4] == 'kpu-qr' and '--zone=us-central2-b' in args, args
    else:
      command = [a for a in args if a.startswith('--command=')][0]
      kind = ('install' if 'pip install' in command else 'launch' if 'nohup' in command else
              'probe' if 'echo idle' in command else 'follow' if 'tail' in command else command)
      worker = [a for a in args if a.startswith('--worker=')][0]
      names.append(f'{kind}{worker[len("--worker"):]}')
  return names


def test_tpu_run_launches_detached_and_follows_worker_0(fake_cloud):
  """The launch and log commands run for real in a shell (the fake worker): the quoting carries
  awkward overrides intact, the run is detached, its log streams, its exit code is kept."""
  env, fake, script = fake_cloud
  script(exit_codes=[0])
  out = _launch('tpu_pod.sh', 'run', *TPU, 'configs/base.py', "gs://bucket/it's here",
                '--config.mesh.shape=(-1,1,1)', '--config.name=a "b" $HOME', env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      f'cwd={fake}/home/kivfm', 'arg=-m', 'arg=kivfm.main', 'arg=--config=configs/base.py',
      "arg=--workdir=gs://bucket/it's here", 'arg=--config.distributed.enabled=True',
      'arg=--config.mesh.shape=(-1,1,1)', 'arg=--config.name=a "b" $HOME']
  assert _calls(fake) == ['launch=all', 'follow=0']
  assert (fake / 'home' / 'kivfm_run' / 'exit_code').read_text() == '0\n'


def test_tpu_watch_resumes_after_preemption(fake_cloud):
  """Absent -> created -> ACTIVE: install, launch; the slice is preempted (SUSPENDING,
  SUSPENDED): delete, recreate, reinstall, relaunch the same command; the run then stops with
  SIGTERM on a live slice (maintenance): relaunch; it ends with 0: watch ends with 0."""
  env, fake, script = fake_cloud
  script(states=['ABSENT', 'WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE', 'SUSPENDING',
                 'SUSPENDED', 'WAITING_FOR_RESOURCES', 'ACTIVE', 'ACTIVE', 'ACTIVE'],
         exit_codes=[143, 143, 0])
  out = _launch('tpu_pod.sh', 'watch', *TPU, *SLICE, '--spot', '--poll=0',
                '--git=https://example.com/kivfm.git', '--branch=dev', *RUN, env=env)
  assert out.returncode == 0, out.stderr
  assert _calls(fake) == [
      'describe', 'create', 'describe', 'describe',
      'describe', 'install=all', 'probe=0', 'launch=all',          # first launch
      'describe', 'describe', 'delete', 'create',                   # preempted: recreate
      'describe', 'describe', 'install=all', 'probe=0', 'launch=all',  # reinstall, relaunch
      'describe', 'probe=0', 'launch=all',                          # exit 143: relaunch
      'describe', 'probe=0']                                        # exit 0: done
  calls = [json.loads(line) for line in (fake / 'calls.jsonl').read_text().splitlines()]
  creates = [c for c in calls if c[3] == 'create']
  assert all(c[-1] == '--spot' and '--accelerator-type=v4-32' in c for c in creates)
  launches = (fake / 'home' / 'launches').read_text().splitlines()
  assert launches == ['-m kivfm.main --config=configs/base.py --workdir=gs://bucket/kpu '
                      '--config.distributed.enabled=True --config.total_steps=100'] * 3
  assert 'run finished' in out.stderr


def test_tpu_watch_stops_when_the_run_fails(fake_cloud):
  env, fake, script = fake_cloud
  script(states=['ACTIVE', 'ACTIVE'], exit_codes=[2])
  out = _launch('tpu_pod.sh', 'watch', *TPU, *SLICE, '--poll=0', *RUN, env=env)
  assert out.returncode == 2
  assert 'run failed (exit 2)' in out.stderr
  assert _calls(fake) == ['describe', 'probe=0', 'launch=all', 'describe', 'probe=0']


def test_tpu_watch_gives_up_after_max_restarts(fake_cloud):
  env, fake, script = fake_cloud
  script(states=['ACTIVE'] * 3, exit_codes=[143, 143])
  out = _launch('tpu_pod.sh', 'watch', *TPU, *SLICE, '--poll=0', '--max-restarts=1', *RUN,
                env=env)
  assert out.returncode == 2
  assert 'gave up after 1 restarts' in out.stderr
  assert _calls(fake).count('launch=all') == 2
