"""kivfm's commands restart once with TCMalloc preloaded (`kivfm.allocator`): the same
interpreter and command line with LD_PRELOAD extended; never twice, never with
KIVFM_TCMALLOC=0; a hint when TCMalloc is missing; and for real, in a subprocess, with the
library installed by the README's command."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kivfm import allocator


@pytest.fixture
def fake_library(tmp_path):
  (tmp_path / 'libtcmalloc_minimal.so.4').write_bytes(b'')
  return tmp_path


def _restart(monkeypatch, search_dirs, **env):
  for name in ('LD_PRELOAD', allocator.SWITCH):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  allocator.restart_with_tcmalloc(execve=lambda *args: calls.append(args),
                                  search_dirs=(str(search_dirs),))
  return calls


def test_restarts_the_same_command_with_the_library_preloaded(monkeypatch, fake_library):
  calls = _restart(monkeypatch, fake_library, LD_PRELOAD='/opt/other.so')
  assert len(calls) == 1
  executable, argv, env = calls[0]
  assert executable == sys.executable and argv == sys.orig_argv
  assert env['LD_PRELOAD'] == f'{fake_library}/libtcmalloc_minimal.so.4 /opt/other.so'


def test_no_restart_when_preloaded_switched_off_or_missing(monkeypatch, fake_library, tmp_path,
                                                           capsys):
  assert not _restart(monkeypatch, fake_library, LD_PRELOAD='/x/libtcmalloc.so.4')
  assert not _restart(monkeypatch, fake_library, KIVFM_TCMALLOC='0')
  assert capsys.readouterr().err == ''
  assert not _restart(monkeypatch, tmp_path / 'empty')
  assert allocator.INSTALL_HINT in capsys.readouterr().err


def test_a_command_runs_under_tcmalloc_with_its_arguments(tmp_path):
  assert allocator.find_tcmalloc(), f'TCMalloc is not installed: {allocator.INSTALL_HINT}'
  script = tmp_path / 'command.py'
  script.write_text(
      'import sys\nfrom kivfm import allocator\n'
      "if __name__ == '__main__':\n"
      '  allocator.restart_with_tcmalloc()\n'
      "  print('tcmalloc' in open('/proc/self/maps').read(), sys.flags.optimize, sys.argv[1:])\n")
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', allocator.SWITCH)}
  env['PYTHONPATH'] = os.getcwd()
  run = lambda *extra: subprocess.run([sys.executable, '-O', str(script), '--a=1', 'b'],
                                      env={**env, **dict(extra)}, capture_output=True,
                                      text=True, check=True).stdout.strip()
  assert run() == "True 1 ['--a=1', 'b']"
  assert run((allocator.SWITCH, '0')) == "False 1 ['--a=1', 'b']"
