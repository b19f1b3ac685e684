"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), off by default; numbers from it are reported as "re-ranked".

Follows the authors' reference procedure, without Python loops over samples:
  1. D = squared distances over all N = Q + G images, each row divided by its column maximum
     (D / max over axis 0, transposed, as the reference code does).
  2. Ranking by D (stable: ties by index). R(i, k) = the k-reciprocal neighbours of i: j among the
     k + 1 nearest of i with i among the k + 1 nearest of j.
  3. Expansion: add R(c, round(k1 / 2)) of every c in R(i, k1) that shares more than 2/3 of its
     members with R(i, k1).
  4. V[i, j] = exp(-D[i, j]) normalised over the expanded set of i; query expansion: V[i] = mean of
     V over the k2 nearest of i.
  5. Jaccard distance 1 - s / (2 - s), s = sum_k min(V[i, k], V[j, k]), computed over the non-zero
     entries only; final = (1 - lambda) * Jaccard + lambda * D.
Memory: a few dense N x N float32 matrices (about 0.2 GB for SYSU-MM01's N = 4104).
"""
from __future__ import annotations

import numpy as np

from eees_jax.evaluation.metrics import _normalise_rows


def _reciprocal(top: np.ndarray) -> np.ndarray:
  """[N, K] bool: top[i, m] is a k-reciprocal neighbour of i (i is among top[top[i, m]])."""
  n = top.shape[0]
  out = np.empty(top.shape, bool)
  for s in range(0, n, 4096):  # [rows, K, K] at a time
    back = top[top[s:s + 4096]]
    out[s:s + 4096] = (back == np.arange(s, min(s + 4096, n))[:, None, None]).any(axis=-1)
  return out


def _initial_rank(dist: np.ndarray, k: int, rows: int = 1024) -> np.ndarray:
  """[N, k] indices of the k nearest per row (stable argsort, chunked to bound memory)."""
  return np.concatenate([np.argsort(dist[s:s + rows], axis=1, kind="stable")[:, :k]
                         for s in range(0, dist.shape[0], rows)])


def re_ranking(q_g_dist: np.ndarray, q_q_dist: np.ndarray, g_g_dist: np.ndarray, k1: int = 20,
               k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
  """Re-ranked distances [Q, G] from the distances q-g [Q, G], q-q [Q, Q], g-g [G, G].

  The inputs are squared inside (as in the reference code), so pass Euclidean-like distances.
  """
  q_g = np.asarray(q_g_dist, np.float32)
  num_q, num_g = q_g.shape
  if np.shape(q_q_dist) != (num_q, num_q) or np.shape(g_g_dist) != (num_g, num_g):
    raise ValueError(f"re_ranking: q_q {np.shape(q_q_dist)} and g_g {np.shape(g_g_dist)} do not fit "
                     f"q_g {q_g.shape}")
  if k1 < 1 or k2 < 1:
    raise ValueError(f"re_ranking: k1 and k2 must be >= 1, got {k1}, {k2}")
  num = num_q + num_g
  dist = np.block([[np.asarray(q_q_dist, np.float32), q_g],
                   [q_g.T, np.asarray(g_g_dist, np.float32)]])
  np.square(dist, out=dist)
  dist = np.ascontiguousarray((dist / np.max(dist, axis=0)).T)
  half = int(np.around(k1 / 2.0))  # numpy rounding (half to even), as the reference code
  rank = _initial_rank(dist, max(k1 + 1, k2))

  # k-reciprocal sets R(i, k1) as a dense mask, and R(c, k1/2) as (indices, validity).
  top, top_half = rank[:, :k1 + 1], rank[:, :half + 1]
  recip, recip_half = _reciprocal(top), _reciprocal(top_half)
  in_r = np.zeros((num, num), bool)
  rows, slots = np.nonzero(recip)
  in_r[rows, top[rows, slots]] = True
  # Expansion: candidate c of R(i) joins with R(c, k1/2) when > 2/3 of R(c, k1/2) is in R(i).
  cand = top[rows, slots]
  members, valid = top_half[cand], recip_half[cand]  # [P, half + 1]
  shared = (in_r[rows[:, None], members] & valid).sum(axis=1)
  accept = shared > 2.0 / 3.0 * valid.sum(axis=1)
  expanded = in_r.copy()
  acc_rows = np.broadcast_to(rows[accept][:, None], members[accept].shape)
  expanded[acc_rows[valid[accept]], members[accept][valid[accept]]] = True
  del in_r

  weight = np.where(expanded, np.exp(-dist), np.float32(0.0)).astype(np.float32)
  del expanded
  v = weight / weight.sum(axis=1, keepdims=True)
  del weight
  if k2 != 1:  # local query expansion
    v_qe = np.zeros_like(v)
    for m in range(k2):
      v_qe += v[rank[:, m]]
    v = v_qe / np.float32(k2)
    del v_qe

  # Jaccard over non-zero entries: s[i, j] = sum_k min(v[i, k], v[j, k]), queries i x gallery j.
  gal_k, gal_j = np.nonzero(v[num_q:].T)  # by column k, then gallery row j
  gal_v = v[num_q:][gal_j, gal_k]
  col_count = np.bincount(gal_k, minlength=num)
  col_start = np.cumsum(col_count) - col_count
  jaccard = np.empty((num_q, num_g), np.float32)
  block = 256
  for s in range(0, num_q, block):
    vq = v[s:min(s + block, num_q)]
    qi, qk = np.nonzero(vq)
    counts = col_count[qk]
    pair = np.repeat(np.arange(len(qi)), counts)
    pos = col_start[qk][pair] + np.arange(len(pair)) - np.repeat(np.cumsum(counts) - counts, counts)
    mins = np.minimum(vq[qi, qk][pair], gal_v[pos])
    sim = np.bincount(qi[pair] * num_g + gal_j[pos], weights=mins,
                      minlength=vq.shape[0] * num_g).reshape(vq.shape[0], num_g)
    jaccard[s:s + block] = 1.0 - sim / (2.0 - sim)
  return (jaccard * np.float32(1 - lambda_value)
          + dist[:num_q, num_q:] * np.float32(lambda_value)).astype(np.float32)


def k_reciprocal_rerank(q_feats: np.ndarray, g_feats: np.ndarray, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> np.ndarray:
  """Re-ranked distances [Q, G] from features [Q, d], [G, d]: Euclidean distances between the
  L2-normalised features (squared inside `re_ranking`), as the reference code uses them."""
  q, g = _normalise_rows(q_feats), _normalise_rows(g_feats)

  def euclid(a, b):
    return np.sqrt(np.maximum(2.0 - 2.0 * (a @ b.T), 0.0)).astype(np.float32)

  return re_ranking(euclid(q, g), euclid(q, q), euclid(g, g), k1=k1, k2=k2,
                    lambda_value=lambda_value)
