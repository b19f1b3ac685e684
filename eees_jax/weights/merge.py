"""Partial loading: copy selected leaves of one parameter tree into another, and count parameters."""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Iterable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from eees_jax.weights.errors import MAX_LISTED, listing

Tree = dict[str, Any]


@dataclasses.dataclass
class MergeReport:
  loaded: list[str]    # target paths copied from the source
  fresh: list[str]     # target paths (under target_prefix) left as they were
  skipped: list[str]   # source paths not selected by any regex


def merge_params(target: Tree, source: Tree, include: Iterable[str], *, what: str = "params",
                 target_prefix: str = "", return_report: bool = False):
  """Copies the leaves of `source` whose '/'-joined path matches any regex of `include`
  (re.search) into `target` at target_prefix + path; returns the new tree (and a MergeReport if
  return_report). `what` names the trees in messages and the log.

  Errors (ValueError, listing all offenders): a regex that selects nothing, a selected source
  leaf with no counterpart in target, or a shape mismatch. Copied leaves take the target's dtype.
  The report (loaded / left fresh) is logged at INFO level.
  """
  if isinstance(include, str):
    raise TypeError("include must be a sequence of regexes, not one string")
  patterns = [re.compile(r) for r in include]
  if not patterns:
    raise ValueError(f"merge_params ({what}): include is empty, nothing would be loaded")
  frozen = isinstance(target, flax.core.FrozenDict)
  flat_t = traverse_util.flatten_dict(flax.core.unfreeze(target), sep="/")
  flat_s = traverse_util.flatten_dict(flax.core.unfreeze(source), sep="/")
  loaded, skipped, absent, mismatched = [], [], [], []
  used = [False] * len(patterns)
  new = dict(flat_t)
  for path, value in flat_s.items():
    hits = [i for i, p in enumerate(patterns) if p.search(path)]
    if not hits:
      skipped.append(path)
      continue
    for i in hits:
      used[i] = True
    tpath = target_prefix + path
    if tpath not in flat_t:
      absent.append(tpath)
      continue
    if tuple(np.shape(value)) != tuple(np.shape(flat_t[tpath])):
      mismatched.append(f"{tpath} source {tuple(np.shape(value))} target "
                        f"{tuple(np.shape(flat_t[tpath]))}")
      continue
    new[tpath] = jnp.asarray(value, dtype=jnp.asarray(flat_t[tpath]).dtype)
    loaded.append(tpath)
  problems = []
  unused = [p.pattern for p, u in zip(patterns, used) if not u]
  if unused:
    problems.append(f"regexes selecting no source leaf: {unused}")
  if absent:
    problems.append(listing(absent, "selected source leaves missing from the target"))
  if mismatched:
    problems.append(listing(mismatched, "shape mismatches"))
  if problems:
    raise ValueError(f"merge_params ({what}): " + "; ".join(problems))
  loaded_set = set(loaded)
  fresh = [p for p in flat_t if p.startswith(target_prefix) and p not in loaded_set]
  logging.info("merge_params (%s): loaded %d leaves, left %d fresh: %s", what, len(loaded),
               len(fresh), fresh[:MAX_LISTED])
  tree = traverse_util.unflatten_dict(new, sep="/")
  tree = flax.core.freeze(tree) if frozen else tree
  if return_report:
    return tree, MergeReport(loaded, fresh, skipped)
  return tree


def count_params(tree: Tree) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
