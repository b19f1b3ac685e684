"""AGW identity sampler: which records every training step uses (SPEC section 2).

Pure numpy and deterministic: the order of epoch e is a function of (seed, e) alone, so a run that
resumes at global step s rebuilds exactly the indices it would have seen.
"""
from __future__ import annotations

import math

import numpy as np

from data_pipelines.records import INFRARED, VISIBLE, DatasetError, TrainSet


def steps_per_epoch(train_set: TrainSet, P: int, K: int) -> int:
  """ceil(max(#visible, #infrared) / (P*K)): an epoch shows ~every image of the larger modality."""
  _check_pk(P, K)
  num_visible = sum(1 for r in train_set.records if r.modality == VISIBLE)
  num_infrared = sum(1 for r in train_set.records if r.modality == INFRARED)
  if max(num_visible, num_infrared) == 0:
    raise DatasetError(f"training set under {train_set.root!r} has no visible or infrared images")
  return math.ceil(max(num_visible, num_infrared) / (P * K))


def identity_pools(train_set: TrainSet) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """pid -> (visible record indices, infrared record indices), only for identities with both."""
  visible: dict[int, list[int]] = {}
  infrared: dict[int, list[int]] = {}
  for i, r in enumerate(train_set.records):
    if r.modality == VISIBLE:
      visible.setdefault(r.pid, []).append(i)
    elif r.modality == INFRARED:
      infrared.setdefault(r.pid, []).append(i)
    else:
      raise DatasetError(
          f"record {r.path!r} of {train_set.root!r} has unknown modality {r.modality}")
  return {pid: (np.asarray(visible[pid], np.int64), np.asarray(infrared[pid], np.int64))
          for pid in sorted(visible) if pid in infrared}


def epoch_indices(train_set: TrainSet, P: int, K: int, seed: int, epoch: int) -> np.ndarray:
  """Record indices of every step of one epoch.

  Returns int64 [steps_per_epoch, 2, P*K]: row 0 visible, row 1 infrared record indices. Identity
  j of a step (P distinct identities, each with both modalities) fills positions j*K .. j*K+K-1 of
  both rows, so visible position i and infrared position i show the same person. Inside an
  identity the K images of a modality are drawn without replacement, or with replacement when it
  has fewer than K.
  """
  _check_pk(P, K)
  pools = identity_pools(train_set)
  if len(pools) < P:
    raise DatasetError(
        f"training set under {train_set.root!r} has {len(pools)} identities with both visible and "
        f"infrared images, fewer than P={P} identities per step; lower P")
  pids = np.asarray(list(pools), np.int64)
  steps = steps_per_epoch(train_set, P, K)
  rng = np.random.default_rng([seed, epoch])
  out = np.empty((steps, 2, P * K), np.int64)
  for s in range(steps):
    chosen = rng.choice(pids, size=P, replace=False)
    for j, pid in enumerate(chosen):
      for m, pool in enumerate(pools[int(pid)]):
        out[s, m, j * K:(j + 1) * K] = rng.choice(pool, size=K, replace=len(pool) < K)
  return out


def _check_pk(P: int, K: int) -> None:
  if int(P) != P or int(K) != K or P < 1 or K < 1:
    raise ValueError(f"P and K must be positive integers, got P={P!r}, K={K!r}")
