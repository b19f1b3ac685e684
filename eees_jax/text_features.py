"""Description embeddings for training: tokenised once, and with a frozen tower embedded once.

With a frozen text tower the features of every description are fixed, so they are computed before
training (batched, jitted) and cached in the workdir under a key made of the tokens, the tower's
configuration and its parameters: a changed tokenizer, description file or tower invalidates it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm


def cache_key(tokens: np.ndarray, text_config: dict, text_params: Any) -> str:
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(tokens).tobytes())
  h.update(json.dumps(text_config, sort_keys=True, default=str).encode())
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(text_params), key=lambda kv: str(kv[0])):
    h.update(str(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:20]


def embed_tokens(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, tokens: np.ndarray,
                 batch_size: int) -> np.ndarray:
  """Runs the text tower over `tokens` [n, L] in fixed-size batches; returns float32 [n, D]."""
  fn = jax.jit(apply_fn)
  n = len(tokens)
  out = []
  for start in tqdm(range(0, n, batch_size), desc="embedding descriptions", unit="batch",
                    disable=n <= batch_size):
    chunk = tokens[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:  # fixed shape: one compilation
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(params, jnp.asarray(chunk)))[:batch_size - pad])
  return np.concatenate(out).astype(np.float32)


def frozen_text_features(workdir: str, tokens: np.ndarray, text_config: dict, text_params: Any,
                         apply_fn: Callable, batch_size: int) -> np.ndarray:
  """Embeddings of `tokens` [n, L] by a frozen tower, from the workdir cache when it is valid."""
  key = cache_key(tokens, text_config, text_params)
  path = os.path.join(workdir, "text_features", f"{key}.npy")
  if os.path.exists(path):
    logging.info("Description features from cache %s", path)
    return np.load(path)
  feats = embed_tokens(apply_fn, text_params, tokens, batch_size)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npy"
  np.save(tmp, feats)
  os.replace(tmp, path)  # never a half-written cache
  return feats


def unique_tokens(texts: Sequence[str], tokenize: Callable[[Sequence[str]], np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises each distinct text once: returns (tokens [u, L], index [n] into them)."""
  uniq, index = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
  return tokenize(list(uniq)), index.astype(np.int32)
