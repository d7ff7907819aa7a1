"""kivfm installs as a package (`pip install .`, `pip install git+URL`) with its runtime
dependencies, and works from the installed copy outside the checkout."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_gives_a_working_package(tmp_path):
  source = tmp_path / 'src'   # a copy, so the build leaves nothing in the checkout
  shutil.copytree(REPO_ROOT / 'kivfm', source / 'kivfm',
                  ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md', 'requirements.txt', 'requirements-test.txt'):
    shutil.copy(REPO_ROOT / name, source / name)
  site = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps',
                  '--no-build-isolation', f'--target={site}', str(source)], check=True,
                 capture_output=True, timeout=300)
  metadata = next(site.glob('kivfm-*.dist-info')) / 'METADATA'
  requires = {line.split(': ', 1)[1] for line in metadata.read_text().splitlines()
              if line.startswith('Requires-Dist: ') and 'extra ==' not in line}
  pinned = {line.strip() for line in (REPO_ROOT / 'requirements.txt').read_text().splitlines()
            if line.strip() and not line.startswith('#')}
  assert requires == pinned
  assert (site / 'kivfm' / 'kernels' / 'attention_cpu.cc').is_file()   # built on first use
  probe = ('import kivfm, kivfm.main, kivfm.train, kivfm.teachers, kivfm.data.offline; '
           'print(kivfm.__file__)')
  out = subprocess.run([sys.executable, '-c', probe], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={'PYTHONPATH': str(site), 'PATH': '/usr/bin'})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().startswith(str(site))
