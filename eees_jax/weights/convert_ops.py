"""Shared pieces of the two converters: a tensor source that records missing, unknown and
mis-shaped keys, and the torch -> flax layout changes (conv OIHW -> HWIO, linear weights
transposed, BatchNorm weight/bias -> scale/bias and running_mean/var -> mean/var, one stem stacked
once per modality).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from eees_jax.weights.errors import CheckpointError, listing

Tree = dict[str, Any]


class Source:
  """Checkpoint tensors consumed by a converter, recording missing / mis-shaped / unused keys."""

  def __init__(self, tensors: Mapping[str, np.ndarray], origin: str):
    self.tensors, self.origin = tensors, origin
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.bad_shapes: list[str] = []

  def require(self, key: str) -> np.ndarray:
    """A tensor needed to infer the architecture: missing is an immediate error."""
    if key not in self.tensors:
      raise CheckpointError(f"{self.origin}: missing key {key!r}, needed to infer the "
                            f"architecture ({listing(sorted(self.tensors), 'keys present')})")
    return self.tensors[key]

  def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    self.used.add(key)
    if key not in self.tensors:
      self.missing.append(key)
      return np.zeros(shape, np.float32)
    value = np.asarray(self.tensors[key])
    if tuple(value.shape) != tuple(shape):
      self.bad_shapes.append(f"{key} {tuple(value.shape)} (expected {tuple(shape)})")
      return np.zeros(shape, np.float32)
    return value.astype(np.float32)

  def finish(self, ignored: Callable[[str], bool], arch: str) -> None:
    unknown = sorted(k for k in self.tensors if k not in self.used and not ignored(k))
    problems = []
    if self.missing:
      problems.append(listing(self.missing, "missing keys"))
    if unknown:
      problems.append(listing(unknown, "unknown keys"))
    if self.bad_shapes:
      problems.append(listing(self.bad_shapes, "wrong shapes"))
    if problems:
      raise CheckpointError(f"{self.origin}: the checkpoint does not match the inferred "
                            f"architecture ({arch}): " + "; ".join(problems))


def conv(src: Source, key: str, oihw: tuple[int, ...]) -> np.ndarray:
  return np.transpose(src.take(key, oihw), (2, 3, 1, 0))  # OIHW -> HWIO


def dense(src: Source, prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> Tree:
  d = {"kernel": src.take(f"{prefix}.weight", (out_dim, in_dim)).T}
  if bias:
    d["bias"] = src.take(f"{prefix}.bias", (out_dim,))
  return d


def ln(src: Source, prefix: str, dim: int) -> Tree:
  return {"scale": src.take(f"{prefix}.weight", (dim,)), "bias": src.take(f"{prefix}.bias", (dim,))}


def bn(src: Source, prefix: str, dim: int) -> tuple[Tree, Tree]:
  params = {"scale": src.take(f"{prefix}.weight", (dim,)), "bias": src.take(f"{prefix}.bias", (dim,))}
  stats = {"mean": src.take(f"{prefix}.running_mean", (dim,)),
           "var": src.take(f"{prefix}.running_var", (dim,))}
  return params, stats


def stack(tree: Tree, m: int) -> Tree:
  return jax.tree.map(lambda a: np.stack([a] * m), tree)


def count_blocks(keys: Iterable[str], prefix: str, index_pos: int) -> int:
  """Number of distinct integer indices at dotted position index_pos among keys under prefix."""
  idx = {int(k.split(".")[index_pos]) for k in keys if k.startswith(prefix)}
  if idx and idx != set(range(len(idx))):
    raise CheckpointError(f"block indices under {prefix!r} are not 0..n-1: {sorted(idx)}")
  return len(idx)


def square_grid(n_tokens: int, key: str, origin: str) -> int:
  g = round((n_tokens - 1) ** 0.5)
  if g * g + 1 != n_tokens:
    raise CheckpointError(f"{origin}: {key} has {n_tokens} rows, not a square grid + 1")
  return g
