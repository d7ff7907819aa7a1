"""TCMalloc as the host allocator of kivfm's commands.

XLA:CPU allocates each step's temporary buffers afresh (11.7 GB at batch 64 / 224 px of the
benchmarked step). glibc's malloc hands such blocks back to the OS when they are freed and
page-faults them in again at the next step; TCMalloc keeps them. Measured on a 2-core Xeon
(`benchmarks/step.py`'s step): 22.3 -> 17.0 s at batch 64 / 224 px, 2.04 -> 1.92 s at batch
32 / 112 px. jemalloc did not help. The allocator can only be chosen when a process starts, so
a command restarts itself once with the library in LD_PRELOAD.
"""
from __future__ import annotations

import os
import sys

LIBRARIES = ('libtcmalloc_minimal.so.4', 'libtcmalloc.so.4')
SEARCH_DIRS = ('/usr/lib/x86_64-linux-gnu', '/usr/lib/aarch64-linux-gnu', '/usr/lib64',
               '/usr/lib', '/usr/local/lib')
SWITCH = 'KIVFM_TCMALLOC'   # '0': keep the default allocator
INSTALL_HINT = 'apt-get install libtcmalloc-minimal4'


def find_tcmalloc(search_dirs=SEARCH_DIRS) -> str | None:
  """The path of an installed TCMalloc shared library, or None."""
  for directory in search_dirs:
    for name in LIBRARIES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def restart_with_tcmalloc(execve=os.execve, search_dirs=SEARCH_DIRS) -> None:
  """Replaces this process by the same command line with TCMalloc preloaded; call it first
  thing in a command's `__main__` block. Returns (doing nothing) off Linux, with
  KIVFM_TCMALLOC=0, when LD_PRELOAD already names TCMalloc (so the restart happens once), or
  when no TCMalloc is installed (then it says how to install it)."""
  preload = os.environ.get('LD_PRELOAD', '')
  if (not sys.platform.startswith('linux') or os.environ.get(SWITCH) == '0'
      or 'tcmalloc' in preload):
    return
  path = find_tcmalloc(search_dirs)
  if path is None:
    print(f'kivfm: TCMalloc not found; `{INSTALL_HINT}` makes XLA:CPU steps up to 1.3x faster '
          f'({SWITCH}=0 hides this note).', file=sys.stderr)
    return
  env = dict(os.environ, LD_PRELOAD=f'{path} {preload}'.strip())
  sys.stdout.flush()
  sys.stderr.flush()
  execve(sys.executable, sys.orig_argv, env)
