"""Description embeddings for training: tokenised once, and with a frozen tower embedded once.

With a frozen text tower the features of every description are fixed, so they are computed before
training (batched, jitted) and cached in the workdir under a key made of the tokens, the tower's
configuration and its parameters: a changed tokenizer, description file or tower invalidates it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

from eees_jax import checkpoints, embedding


def cache_key(tokens: np.ndarray, text_config: dict, text_params: Any) -> str:
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(tokens).tobytes())
  h.update(json.dumps(text_config, sort_keys=True, default=str).encode())
  checkpoints.hash_tree(h, text_params)
  return h.hexdigest()[:20]


def frozen_text_features(workdir: str, tokens: np.ndarray, text_config: dict, text_params: Any,
                         apply_fn: Callable, batch_size: int) -> np.ndarray:
  """Embeddings of `tokens` [n, L] by a frozen tower, from the workdir cache when it is valid."""
  key = cache_key(tokens, text_config, text_params)
  cached = checkpoints.read_text_features(workdir, key)
  if cached is not None:
    logging.info("Description features from the cache in %s (key %s)", workdir, key)
    return cached
  feats = embedding.embed_tokens(apply_fn, text_params, tokens, batch_size)
  checkpoints.write_text_features(workdir, key, feats)  # atomic: never a half-written cache
  return feats


def unique_tokens(texts: Sequence[str], tokenize: Callable[[Sequence[str]], np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises each distinct text once: returns (tokens [u, L], index [n] into them)."""
  uniq, index = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
  return tokenize(list(uniq)), index.astype(np.int32)
