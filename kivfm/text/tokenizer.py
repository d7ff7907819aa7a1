"""CLIP's byte-level BPE tokenizer (lower-cased, 49,408 tokens, 77 per text).

Vocabulary from either file form, local or from the Hugging Face Hub:
  * OpenAI's merge list `bpe_simple_vocab_16e6.txt.gz` (also shipped in the PyPI package
    open-clip-torch): the vocabulary is the 256 byte symbols, the same with the end-of-word
    marker '</w>', one token per merge, then the two special tokens;
  * a Hugging Face CLIP tokenizer's `vocab.json` + `merges.txt`.
Text is cleaned (HTML entities, repeated whitespace), lower-cased and split into words, numbers
digit by digit and punctuation runs before BPE.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
import json
import os

import numpy as np
import regex

CONTEXT = 77
START, END = '<|startoftext|>', '<|endoftext|>'
_NUM_MERGES = 49152 - 256 - 2
_SPLIT = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"
                       r"[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


@functools.lru_cache(maxsize=None)
def byte_symbols() -> dict[int, str]:
  """Byte -> a printable character standing for it (GPT-2's reversible byte alphabet), in
  vocabulary order: the printable bytes themselves, then the others mapped from chr(256) on."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  table = {b: chr(b) for b in printable}
  for i, b in enumerate([b for b in range(256) if b not in table]):
    table[b] = chr(256 + i)
  return table


def open_clip_bpe_file() -> str:
  """The merge list shipped in the PyPI package open-clip-torch (installed without its deps)."""
  try:
    dist = importlib.metadata.distribution('open_clip_torch')
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError('the CLIP vocabulary file comes with the PyPI package '
                            'open-clip-torch: pip install --no-deps open-clip-torch, or pass '
                            'a vocabulary file') from e
  for file in dist.files or ():
    if str(file).endswith('bpe_simple_vocab_16e6.txt.gz'):
      return str(dist.locate_file(file))
  raise FileNotFoundError('open-clip-torch is installed without bpe_simple_vocab_16e6.txt.gz')


class ClipTokenizer:
  """texts -> int32 [N, 77] token ids: start, BPE tokens (truncated), end, zero padding."""

  def __init__(self, merges: list[tuple[str, str]], vocab: dict[str, int]):
    self.ranks = {pair: i for i, pair in enumerate(merges)}
    self.vocab = vocab
    self.start, self.end = vocab[START], vocab[END]
    self._cache = {START: [self.start], END: [self.end]}

  @classmethod
  def from_bpe_file(cls, path: str | None = None) -> ClipTokenizer:
    """From OpenAI's gzipped merge list (default: the one of open-clip-torch)."""
    with gzip.open(path or open_clip_bpe_file(), 'rt', encoding='utf-8') as f:
      lines = f.read().split('\n')[1:_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + '</w>' for s in symbols] + [''.join(m) for m in merges] + [START, END]
    return cls(merges, {token: i for i, token in enumerate(tokens)})

  @classmethod
  def from_hf_files(cls, vocab_json: str, merges_txt: str) -> ClipTokenizer:
    with open(vocab_json, encoding='utf-8') as f:
      vocab = json.load(f)
    with open(merges_txt, encoding='utf-8') as f:
      merges = [tuple(line.split()) for line in f.read().split('\n')[1:] if line.strip()]
    return cls(merges, vocab)

  @classmethod
  def from_hub(cls, repo: str = 'openai/clip-vit-base-patch16') -> ClipTokenizer:
    """From a Hugging Face CLIP repository (needs network on first use; then the HF cache)."""
    from huggingface_hub import hf_hub_download
    return cls.from_hf_files(hf_hub_download(repo, 'vocab.json'),
                             hf_hub_download(repo, 'merges.txt'))

  def _bpe(self, word: str) -> list[int]:
    if word in self._cache:
      return self._cache[word]
    parts = [*word[:-1], word[-1] + '</w>']
    while len(parts) > 1:
      pairs = {(a, b) for a, b in zip(parts, parts[1:])}
      best = min(pairs, key=lambda p: self.ranks.get(p, float('inf')))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids = [self.vocab[p] for p in parts]
    self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE token ids of `text`, without start / end tokens."""
    text = ' '.join(html.unescape(html.unescape(text)).split()).lower()
    symbols = byte_symbols()
    ids = []
    for word in _SPLIT.findall(text):
      ids.extend(self._bpe(''.join(symbols[b] for b in word.encode('utf-8'))))
    return ids

  def __call__(self, texts: list[str], context: int = CONTEXT) -> np.ndarray:
    out = np.zeros((len(texts), context), np.int32)
    for row, text in zip(out, texts):
      ids = [self.start, *self.encode(text)][:context - 1] + [self.end]
      row[:len(ids)] = ids
    return out


def default_tokenizer() -> ClipTokenizer:
  """The open-clip-torch file when installed, else the Hub."""
  try:
    return ClipTokenizer.from_bpe_file()
  except FileNotFoundError:
    if os.environ.get('HF_HUB_OFFLINE'):
      raise
    return ClipTokenizer.from_hub()
