"""CLIP's byte-level BPE tokenizer, on the Rust `tokenizers` library, without any download.

The vocabulary comes from OpenAI's bpe_simple_vocab_16e6.txt.gz (shipped in the clip-anytorch
package, found without importing it) or from a Hugging Face CLIP folder's vocab.json + merges.txt.
Text is cleaned as OpenAI's simple_tokenizer does (ftfy.fix_text, HTML unescaped twice, whitespace
runs collapsed, lower case), split with CLIP's regex, byte-encoded and merged with BPE ('</w>' marks
word ends). `tokenize` returns OpenAI's clip.tokenize(truncate=True) layout: start-of-text, tokens,
end-of-text, zeros; a text longer than the context keeps its first context_length - 2 tokens and
still ends with end-of-text, so the text tower's end-of-text feature is always defined.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
from typing import Sequence

import ftfy
import numpy as np
import tokenizers
from tokenizers import Regex, models, normalizers, pre_tokenizers

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's CLIP pre-tokenisation pattern (simple_tokenizer.py), applied to lower-cased text.
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                r"[^\s\p{L}\p{N}]+")
# CLIP's vocabulary: 256 bytes, 256 bytes + '</w>', 48894 merges, 2 special tokens = 49408.
NUM_MERGES = 49152 - 256 - 2


def byte_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters: printable
  Latin-1 bytes map to themselves, the others to code points 256, 257, ... in byte order."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in printable:
    table[b] = chr(b)
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table  # Insertion order (printable bytes first) is the vocabulary order.


def default_bpe_path() -> str:
  """bpe_simple_vocab_16e6.txt.gz inside the installed clip-anytorch package (not imported)."""
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"{BPE_FILE}: the clip-anytorch package is not installed "
                            "(requirements-nodeps.txt); pass the vocabulary file's path")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, BPE_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{BPE_FILE} not found in the clip package at "
                          f"{list(spec.submodule_search_locations)}")


def read_bpe_file(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(vocab, merges) of OpenAI's gzipped merge list, in the token order of simple_tokenizer."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"BPE vocabulary file not found: {path}")
  lines = gzip.open(path).read().decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{path}: expected {NUM_MERGES} merge lines of two symbols after the header")
  symbols = list(byte_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
  return {t: i for i, t in enumerate(tokens)}, merges


class Tokenizer:
  """CLIP tokenizer: `tokenize(texts)` -> int32 [n, context_length], `count_tokens(texts)`."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
               context_length: int = 77):
    for special in (SOT, EOT):
      if special not in vocab:
        raise ValueError(f"the vocabulary has no {special} token")
    if context_length < 2:
      raise ValueError(f"context_length must be at least 2, got {context_length}")
    self.context_length = context_length
    self.sot_id, self.eot_id = vocab[SOT], vocab[EOT]
    self.vocab_size = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges),
                                          continuing_subword_prefix="", end_of_word_suffix="</w>",
                                          fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(),
                                           normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.add_special_tokens([SOT, EOT])
    self._tok = tok

  @classmethod
  def from_bpe_file(cls, path: str | None = None, context_length: int = 77) -> "Tokenizer":
    """From OpenAI's bpe_simple_vocab_16e6.txt.gz (default: the one in clip-anytorch)."""
    return cls(*read_bpe_file(path or default_bpe_path()), context_length=context_length)

  @classmethod
  def from_vocab_files(cls, vocab_path: str, merges_path: str,
                       context_length: int = 77) -> "Tokenizer":
    """From a Hugging Face vocab.json and merges.txt ('#version' header line, 'a b' per line)."""
    for p in (vocab_path, merges_path):
      if not os.path.isfile(p):
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    with open(vocab_path, encoding="utf-8") as f:
      vocab = json.load(f)
    merges = []
    with open(merges_path, encoding="utf-8") as f:
      for n, line in enumerate(f):
        line = line.rstrip("\n")
        if (n == 0 and line.startswith("#version")) or not line:
          continue
        parts = line.split()
        if len(parts) != 2:
          raise ValueError(f"{merges_path}:{n + 1}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return cls(vocab, merges, context_length=context_length)

  @classmethod
  def load(cls, path: str | None = None, context_length: int = 77) -> "Tokenizer":
    """None: clip-anytorch's vocabulary; a folder: a Hugging Face CLIP checkpoint (vocab.json +
    merges.txt); a file: OpenAI's gzipped BPE merge list."""
    if path is None:
      return cls.from_bpe_file(None, context_length)
    if os.path.isdir(path):
      return cls.from_vocab_files(os.path.join(path, "vocab.json"),
                                  os.path.join(path, "merges.txt"), context_length)
    return cls.from_bpe_file(path, context_length)

  @staticmethod
  def clean(text: str) -> str:
    """OpenAI's basic_clean (ftfy, HTML entities twice, strip); whitespace and case are then
    handled by the tokenizer's normaliser."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """BPE ids of each text, without start/end tokens and without truncation."""
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not one string")
    encodings = self._tok.encode_batch([self.clean(t) for t in texts], add_special_tokens=False)
    return [e.ids for e in encodings]

  def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
    """[n] int32: tokens of each text including start and end of text (> context_length means
    `tokenize` truncates it)."""
    return np.array([len(ids) + 2 for ids in self.encode(texts)], np.int32)

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """[n, context_length] int32: start, ids (the first context_length - 2 if longer), end, 0s."""
    out = np.zeros((len(texts), self.context_length), np.int32)
    keep = self.context_length - 2
    for row, ids in enumerate(self.encode(texts)):
      seq = [self.sot_id] + ids[:keep] + [self.eot_id]
      out[row, :len(seq)] = seq
    return out


def build_tokenizer(spec: str | None = "clip", context_length: int = 77) -> Tokenizer:
  """Tokenizer from a config value: 'clip' (or None / ''): OpenAI's vocabulary shipped in
  clip-anytorch; a folder: a Hugging Face CLIP checkpoint (vocab.json + merges.txt); a file:
  an OpenAI-format gzipped BPE merge list."""
  if spec in (None, "", "clip"):
    return Tokenizer.from_bpe_file(None, context_length)
  if not os.path.exists(spec):
    raise FileNotFoundError(f"tokenizer {spec!r}: expected 'clip', a Hugging Face CLIP folder or "
                            "a bpe_simple_vocab_16e6.txt.gz file")
  return Tokenizer.load(spec, context_length)
