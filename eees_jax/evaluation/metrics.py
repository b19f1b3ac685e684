"""Vectorised VI-ReID ranking metrics: CMC (standard and SYSU "unique identity"), mAP and mINP.

The numbers equal those of the evaluation functions of the AGW code base (Ye et al., "Deep Learning
for Person Re-identification: A Survey and Outlook"; `eval_sysu`, `eval_regdb` in its eval_metrics.py)
and of the DEEN/LLCM code base (`eval_llcm`) for the same distance matrix, computed without a Python
loop over queries. What each protocol does per query, in the ranked gallery list:

  sysu:  a query from camera 3 ignores every gallery image from camera 2 (any identity; both cameras
         are in the same room). Reported CMC: the "unique identity" CMC (below).
  regdb: nothing is removed. Reported CMC: the standard CMC.
  llcm:  gallery images with the query's identity and the query's camera are removed. Reported CMC:
         the unique-identity CMC.

Then, over the kept gallery list of a query:
  - a query with no true match is "invalid": it is left out of mAP and mINP and of the CMC sums; the
    CMC curves are divided by the number of valid queries (as AGW does);
  - standard CMC at rank r: 1 if the first true match is within the first r kept images;
  - unique-identity CMC at rank r: the kept list is reduced to the first occurrence of each identity
    (in ranked order), then 1 if the query identity is within the first r identities;
  - AP: mean over the true matches of (number of true matches up to it) / (its rank);
  - INP: (number of true matches) / (rank of the last true match).

Conventions where AGW's code is undefined or implementation-dependent:
  - Ties: AGW ranks with np.argsort's default (unstable) sort, whose order among equal distances is
    unspecified. Here equal distances are ranked by gallery index (a stable sort); -0.0 equals +0.0.
    Without ties the two agree exactly.
  - max_rank is cut to the gallery size (as AGW). When a query's kept list (or its list of distinct
    identities) is shorter than max_rank, its CMC row is padded with its last value (once matched,
    matched); AGW would fail to stack such ragged rows.
  - Distances must be finite (NaN/inf raise ValueError).
  - Values are fractions in [0, 1], like AGW (the protocol runners report percentages).

How it is computed (per block of query rows; no loop over queries):
  1. Rank every row once with a row-wise NumPy sort of unique integer keys whose order is the
     stable order: for float32 distances and galleries up to 4096 images, 32-bit keys
     (quantised distance << b | gallery index), where rows in which two neighbours share a
     quantisation level but differ in distance are re-ranked with 64-bit keys (float bits << 32 |
     gallery index); other dtypes use a stable argsort. Removed images are keyed last.
  2. True matches: positions where the ranked gallery index belongs to the query's identity
     (a range of indices when the gallery is grouped by identity); AP, INP and the first-match rank
     follow from those positions with bincount/cumsum arithmetic.
  3. Unique-identity rank = number of distinct identities ranked before the first true match, capped
     at max_rank: a small row-wise sort of the identity codes of the first max(2 max_rank, 32)
     ranks, the whole list only for rows that window cannot decide.
  Per-query results do not depend on the block size (`chunk_size`), so chunked and unchunked numbers
  are identical; work memory is O(block rows x gallery), never queries x gallery x anything.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from typing import Callable, Iterator

import numpy as np

PROTOCOLS = ("sysu", "regdb", "llcm")
# The protocol whose unique-identity CMC is the reported "cmc" (AGW eval_sysu, DEEN eval_llcm).
_UNIQUE_CMC_PROTOCOLS = ("sysu", "llcm")
# Elements of one query block (rows x gallery); about 20 bytes of work memory each, per thread.
DEFAULT_BLOCK_ELEMENTS = 1 << 21


def _normalise_rows(x: np.ndarray) -> np.ndarray:
  """L2-normalises rows [n, d] -> [n, d] float32; zero rows stay zero (norm clamped at 1e-12)."""
  x = np.asarray(x, dtype=np.float32)
  if x.ndim != 2:
    raise ValueError(f"features must be a 2-D array [n, d], got shape {x.shape}")
  norm = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float32))
  return x / np.maximum(norm, np.float32(1e-12))[:, None]


def cosine_distance(q_feats: np.ndarray, g_feats: np.ndarray) -> np.ndarray:
  """1 - cosine similarity [nq, ng] float32 between query rows [nq, d] and gallery rows [ng, d].

  Rows are L2-normalised here, so raw or normalised features give the same matrix.
  """
  q, g = _normalise_rows(q_feats), _normalise_rows(g_feats)
  if q.shape[1] != g.shape[1]:
    raise ValueError(f"query features are {q.shape[1]}-d but gallery features {g.shape[1]}-d")
  return np.float32(1.0) - q @ g.T


def pairwise_distance(q_feats: np.ndarray, g_feats: np.ndarray, metric: str = "cosine") -> np.ndarray:
  """Distance matrix [nq, ng] float32 (smaller is closer).

  metric: "cosine" (1 - cosine similarity), "euclidean" or "sqeuclidean" (on the raw rows).
  """
  if metric == "cosine":
    return cosine_distance(q_feats, g_feats)
  if metric not in ("euclidean", "sqeuclidean"):
    raise ValueError(f"metric={metric!r}: expected 'cosine', 'euclidean' or 'sqeuclidean'")
  q, g = np.asarray(q_feats, np.float32), np.asarray(g_feats, np.float32)
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
    raise ValueError(f"features must be [nq, d] and [ng, d], got {q.shape} and {g.shape}")
  d2 = (np.einsum("nd,nd->n", q, q)[:, None] + np.einsum("nd,nd->n", g, g)[None, :]
        - np.float32(2.0) * (q @ g.T))
  np.maximum(d2, 0.0, out=d2)
  return d2 if metric == "sqeuclidean" else np.sqrt(d2)


@dataclasses.dataclass(frozen=True)
class _Gallery:
  """Gallery-side constants shared by all query blocks (P distinct identities)."""
  size: int
  unique_pids: np.ndarray  # [P] sorted distinct gallery identities
  codes: np.ndarray        # [G] int32 identity code 0..P-1 of each gallery image
  cams: np.ndarray | None  # [G] camera ids (None for regdb)
  perm: np.ndarray         # [G] int32 gallery indices grouped by identity code (stable)
  starts: np.ndarray       # [P] int32 first position of each identity group in `perm`
  counts: np.ndarray       # [P] int32 images per identity
  grouped: bool            # perm is the identity: the gallery is already grouped by identity


def _make_gallery(g_pids: np.ndarray, g_camids: np.ndarray | None) -> _Gallery:
  unique_pids, codes = np.unique(g_pids, return_inverse=True)
  codes = codes.astype(np.int32).reshape(-1)
  perm = np.argsort(codes, kind="stable").astype(np.int32)
  counts = np.bincount(codes, minlength=len(unique_pids)).astype(np.int32)
  starts = (np.cumsum(counts) - counts).astype(np.int32)
  return _Gallery(size=len(g_pids), unique_pids=unique_pids, codes=codes, cams=g_camids, perm=perm,
                  starts=starts, counts=counts,
                  grouped=bool(np.array_equal(perm, np.arange(len(g_pids)))))


def _removed(protocol: str, q_codes: np.ndarray, q_cams: np.ndarray | None,
             gal: _Gallery) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray] | None:
  """Gallery images each query of a block ignores: (an index into the [B, G] block, [B] count per
  query), or None when there are none."""
  if protocol == "regdb":
    return None
  if protocol == "sysu":  # camera-3 queries x camera-2 gallery images, any identity
    q3 = q_cams == 3
    cols = np.nonzero(gal.cams == 2)[0]
    if not q3.any() or not len(cols):
      return None
    return np.ix_(np.nonzero(q3)[0], cols), np.where(q3, len(cols), 0)
  # llcm: the gallery images of the query's identity (a contiguous run of `perm`) from its camera.
  n = np.where(q_codes >= 0, gal.counts[q_codes], 0)
  rows = np.repeat(np.arange(len(q_codes)), n)
  offset = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n)
  cols = gal.perm[gal.starts[q_codes[rows]] + offset]
  same_cam = gal.cams[cols] == q_cams[rows]
  rows, cols = rows[same_cam], cols[same_cam]
  if not len(rows):
    return None
  return (rows, cols), np.bincount(rows, minlength=len(q_codes))


def _rows_of(removed, rows: np.ndarray, num_q: int):
  """The part of a removal index (see `_removed`) that falls in `rows`, renumbered 0..len-1."""
  r, c = (a.ravel() for a in np.broadcast_arrays(*removed))
  where = np.full(num_q, -1)
  where[rows] = np.arange(len(rows))
  keep = where[r] >= 0
  return where[r][keep], c[keep]


def _index_exact(dist: np.ndarray, removed, nonnegative: bool) -> np.ndarray:
  """[B, G] int32 gallery index at each rank (maybe a strided view): ascending distance, ties by
  gallery index, removed images last. One sort of unique 64-bit keys for float32 distances
  ((order-preserving float bits) << 32 | gallery index), a stable argsort otherwise."""
  num_q, num_g = dist.shape
  if dist.dtype not in (np.float32, np.float16) or sys.byteorder != "little":
    d = np.array(dist, dtype=np.float64)
    if removed is not None:
      d[removed] = np.inf
    return np.argsort(d, axis=1, kind="stable").astype(np.int32)
  keys = np.empty((num_q, num_g), np.int64)
  low = keys.view(np.int32).reshape(num_q, num_g, 2)[..., 0]
  high = keys.view(np.float32).reshape(num_q, num_g, 2)[..., 1]
  low[...] = np.arange(num_g, dtype=np.int32)
  np.add(dist, np.float32(0.0), out=high)  # -0.0 + 0.0 = +0.0: the two zeros tie
  if removed is not None:
    high[removed] = np.inf
  if not nonnegative:  # non-negative floats already order as their int32 bits
    bits = high.view(np.int32)
    flip = bits >> 31  # negative floats: flip the magnitude bits (sign kept) -> signed int order
    flip &= np.int32(0x7FFFFFFF)
    bits ^= flip
    del flip
  keys.sort(axis=1)
  return low


# The 32-bit key path is used when the gallery index leaves at least this many bits for the
# quantised distance (galleries up to 4096 images).
_MIN_LEVEL_BITS = 19
_ROUNDING_BIAS = np.float32(1.5 * 2**23)  # x + bias stores round(x) in the low mantissa bits


def _index_quantised(dist: np.ndarray, removed, lowest: float, highest: float
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Fast path: one sort of 32-bit keys (quantised distance << b | gallery index, b index bits).

  Quantisation: level = round((x - lowest) * scale) with at most 2**min(22, 31 - b) levels, taken
  from the low mantissa bits of (x - lowest) * scale + 1.5 * 2**23 (the other bits are the same for
  every element). It is monotone, so the sorted order is exact except possibly among neighbours
  that share a level; rows where two such neighbours have different distances are returned as
  ambiguous, for `_index_exact`. Removed images get the top level.
  Returns ([B, G] int32 gallery index at each rank, ambiguous row numbers).
  """
  num_q, num_g = dist.shape
  bits = max(1, (num_g - 1).bit_length())
  top = (1 << min(22, 31 - bits)) - 1
  span = float(highest) - float(lowest)
  scale = np.float32((top - 2) / span) if span > 0 else np.float32(0.0)
  z = np.multiply(dist, scale, dtype=np.float32)
  z += _ROUNDING_BIAS - np.float32(lowest) * scale  # in [bias, bias + top - 1]: same exponent
  if removed is not None:
    z[removed] = _ROUNDING_BIAS + np.float32(top)
  keys = z.view(np.int32)
  keys <<= bits
  keys |= np.arange(num_g, dtype=np.int32)
  keys.sort(axis=1)
  level = keys >> bits
  shared = level[:, 1:] == level[:, :-1]  # neighbours sharing a level
  if removed is not None:  # removed images share the top level; their order does not matter
    removed_key = np.array([_ROUNDING_BIAS + np.float32(top)], np.float32).view(np.int32) << bits
    shared &= level[:, 1:] != (removed_key >> bits)[0]
  del level
  row, col = np.divmod(np.flatnonzero(shared), num_g - 1)
  del shared
  keys &= np.int32((1 << bits) - 1)
  ambiguous = dist[row, keys[row, col]] != dist[row, keys[row, col + 1]]
  return keys, np.unique(row[ambiguous])


def _sorted_gallery_index(dist: np.ndarray, removed, nonnegative: bool, lowest: float,
                          highest: float) -> np.ndarray:
  """[B, G] int32 gallery index at each rank: ascending distance, ties by gallery index (-0.0
  equals +0.0), removed images last."""
  num_q, num_g = dist.shape
  if (dist.dtype not in (np.float32, np.float16) or num_g < 2
      or 31 - (num_g - 1).bit_length() < _MIN_LEVEL_BITS):
    return _index_exact(dist, removed, nonnegative)
  index, ambiguous = _index_quantised(dist, removed, lowest, highest)
  if len(ambiguous):
    sub = None if removed is None else _rows_of(removed, ambiguous, num_q)
    index[ambiguous] = _index_exact(dist[ambiguous], sub, nonnegative)
  return index


def _distinct_before(codes_sorted: np.ndarray, first: np.ndarray, sentinel: int) -> np.ndarray:
  """Number of distinct identity codes among the first `first[i]` entries of row i of
  codes_sorted [F, W] (positions >= W are not seen)."""
  c = codes_sorted.copy()
  c[np.arange(c.shape[1])[None, :] >= first[:, None]] = sentinel
  c.sort(axis=1)
  change = np.ones(c.shape, bool)
  np.not_equal(c[:, 1:], c[:, :-1], out=change[:, 1:])
  return change.sum(axis=1) - (c[:, -1] == sentinel)


def _block(dist: np.ndarray, q_codes: np.ndarray, q_cams: np.ndarray | None, gal: _Gallery,
           protocol: str, max_rank: int, lowest: float, highest: float) -> dict[str, np.ndarray]:
  """Per-query results for one block of rows of the distance matrix [B, G].

  Returns [B] arrays: n_rel (true matches kept), ap, inp (nan where n_rel == 0), first (0-based kept
  rank of the first true match), unique (0-based rank of the query identity among the distinct kept
  identities, capped at max_rank); first/unique are -1 where n_rel == 0.
  """
  num_q, num_g = dist.shape
  removed = _removed(protocol, q_codes, q_cams, gal)
  index = _sorted_gallery_index(dist, None if removed is None else removed[0], lowest >= 0,
                                lowest, highest)
  if gal.grouped:  # identity c owns the gallery indices starts[c] .. starts[c] + counts[c] - 1
    start = np.where(q_codes >= 0, gal.starts[q_codes], 0).astype(np.int32)
    count = np.where(q_codes >= 0, gal.counts[q_codes], 0).astype(np.uint32)
    offset = np.subtract(index, start[:, None], dtype=np.int32)
    match = offset.view(np.uint32) < count[:, None]
    del offset
  else:
    match = gal.codes[index] == q_codes[:, None]
  rows, cols = np.divmod(np.flatnonzero(match), num_g)  # row-major: by query, then by rank
  del match
  if removed is not None:  # removed images sit at the end of each ranked list
    ok = cols < num_g - removed[1][rows]
    rows, cols = rows[ok], cols[ok]

  n_rel = np.bincount(rows, minlength=num_q)
  first_idx = np.cumsum(n_rel) - n_rel  # index into rows/cols of each query's first true match
  k = np.arange(len(rows)) - first_idx[rows]  # 0-based index of a match among its query's matches
  ap_sum = np.bincount(rows, weights=(k + 1.0) / (cols + 1.0), minlength=num_q)

  vq = np.nonzero(n_rel)[0]
  first = np.full(num_q, -1, np.int64)
  unique = np.full(num_q, -1, np.int64)
  ap = np.full(num_q, np.nan)
  inp = np.full(num_q, np.nan)
  first[vq] = cols[first_idx[vq]]
  last = cols[first_idx[vq] + n_rel[vq] - 1]
  ap[vq] = ap_sum[vq] / n_rel[vq]
  inp[vq] = n_rel[vq] / (last + 1.0)

  # Unique-identity rank = distinct identities ranked before the first true match (removed images
  # rank after it). Only min(rank, max_rank) matters: look at a window of the first W ranks, and at
  # the whole list only for the queries whose window is too short to decide.
  width = min(num_g, max(2 * max_rank, 32))
  sentinel = len(gal.unique_pids)
  u = _distinct_before(gal.codes[index[vq, :width]], first[vq], sentinel)
  undecided = (first[vq] > width) & (u < max_rank)
  if undecided.any():
    rows_u = vq[undecided]
    u[undecided] = _distinct_before(gal.codes[index[rows_u]], first[rows_u], sentinel)
  unique[vq] = np.minimum(u, max_rank)
  return dict(n_rel=n_rel, ap=ap, inp=inp, first=first, unique=unique)


def _check_labels(name: str, x, n: int) -> np.ndarray:
  arr = np.asarray(x).reshape(-1) if x is not None else None
  if arr is None or arr.shape[0] != n:
    raise ValueError(f"{name} must have one entry per {'row' if name.startswith('q') else 'column'} "
                     f"of the distance matrix ({n}), got {None if arr is None else arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    if not np.all(np.equal(np.mod(arr, 1), 0)):
      raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
  return arr.astype(np.int64)


def _curve(ranks: np.ndarray, max_rank: int, num_valid: int) -> np.ndarray:
  """CMC [max_rank] float64 from 0-based ranks of valid queries (fractions of valid queries)."""
  hist = np.bincount(np.minimum(ranks, max_rank), minlength=max_rank + 1)[:max_rank]
  return np.cumsum(hist) / float(num_valid)


def _thread_count(num_threads: int | None) -> int:
  if num_threads is None:
    return 1
  if num_threads == -1:
    return os.cpu_count() or 1
  if int(num_threads) < 1:
    raise ValueError(f"num_threads must be >= 1, got {num_threads}")
  return int(num_threads)


def _iter_blocks(num_q: int, num_g: int, chunk_size: int | None,
                 num_threads: int = 1) -> Iterator[slice]:
  """Query row blocks: `chunk_size` rows, or by default at most DEFAULT_BLOCK_ELEMENTS elements
  and at least one block per thread (blocks of >= 64 rows)."""
  if chunk_size is None:
    chunk_size = max(1, DEFAULT_BLOCK_ELEMENTS // max(num_g, 1))
    chunk_size = min(chunk_size, max(64, -(-num_q // num_threads)))
  if int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be a positive number of query rows, got {chunk_size}")
  chunk_size = int(chunk_size)
  for s in range(0, num_q, chunk_size):
    yield slice(s, min(s + chunk_size, num_q))


def _evaluate_blocks(block_dist: Callable[[slice], np.ndarray], num_q: int, num_g: int,
                     q_pids, g_pids, q_camids, g_camids, protocol: str, max_rank: int,
                     chunk_size: int | None, return_per_query: bool,
                     num_threads: int | None) -> dict:
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol={protocol!r}: expected one of {PROTOCOLS}")
  if num_q < 1 or num_g < 1:
    raise ValueError(f"empty distance matrix ({num_q} queries x {num_g} gallery images)")
  if int(max_rank) < 1:
    raise ValueError(f"max_rank must be >= 1, got {max_rank}")
  if num_g >= 2**31:
    raise ValueError(f"gallery of {num_g} images is over the 2**31 limit of the ranking index")
  q_pids = _check_labels("q_pids", q_pids, num_q)
  g_pids = _check_labels("g_pids", g_pids, num_g)
  q_cams = g_cams = None
  if protocol != "regdb":
    if q_camids is None or g_camids is None:
      raise ValueError(f"protocol {protocol!r} needs q_camids and g_camids")
    q_cams = _check_labels("q_camids", q_camids, num_q)
    g_cams = _check_labels("g_camids", g_camids, num_g)
  max_rank = min(int(max_rank), num_g)
  gal = _make_gallery(g_pids, g_cams)
  # Query identity -> gallery identity code, -1 when the identity is not in the gallery.
  q_codes = np.minimum(np.searchsorted(gal.unique_pids, q_pids), len(gal.unique_pids) - 1)
  q_codes = np.where(gal.unique_pids[q_codes] == q_pids, q_codes, -1).astype(np.int32)

  def score(sl: slice) -> dict[str, np.ndarray]:
    dist = block_dist(sl)
    if not np.issubdtype(dist.dtype, np.floating):
      dist = dist.astype(np.float64)
    lowest, highest = dist.min(), dist.max()  # NaN propagates: also the finiteness check
    if not (np.isfinite(lowest) and np.isfinite(highest)):
      bad = sl.start + int(np.nonzero(~np.isfinite(dist).all(axis=1))[0][0])
      raise ValueError(f"distance matrix row {bad} has non-finite values (NaN or inf)")
    return _block(dist, q_codes[sl], None if q_cams is None else q_cams[sl], gal, protocol,
                  max_rank, float(lowest), float(highest))

  num_threads = _thread_count(num_threads)
  blocks = list(_iter_blocks(num_q, num_g, chunk_size, num_threads))
  if num_threads > 1 and len(blocks) > 1:
    # NumPy releases the GIL in the sort and the element-wise passes; blocks are independent.
    with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(blocks))) as pool:
      parts = list(pool.map(score, blocks))
  else:
    parts = [score(sl) for sl in blocks]
  per_q = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  valid = per_q["n_rel"] > 0
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise ValueError("no query has a true match in its gallery (after the protocol's removals): "
                     "check that query and gallery identities overlap")
  cmc_standard = _curve(per_q["first"][valid], max_rank, num_valid)
  cmc_unique = _curve(per_q["unique"][valid], max_rank, num_valid)
  out = {
      "protocol": protocol,
      "cmc": cmc_unique if protocol in _UNIQUE_CMC_PROTOCOLS else cmc_standard,
      "cmc_standard": cmc_standard,
      "cmc_unique": cmc_unique,
      "mAP": float(np.mean(per_q["ap"][valid])),
      "mINP": float(np.mean(per_q["inp"][valid])),
      "num_valid_queries": num_valid,
      "num_queries": num_q,
      "num_gallery": num_g,
      "max_rank": max_rank,
  }
  if return_per_query:
    out["per_query"] = {"valid": valid, "ap": per_q["ap"], "inp": per_q["inp"],
                        "first_match_rank": per_q["first"], "unique_rank": per_q["unique"]}
  return out


def evaluate(distmat: np.ndarray, q_pids, g_pids, q_camids=None, g_camids=None,
             protocol: str = "sysu", max_rank: int = 20, chunk_size: int | None = None,
             return_per_query: bool = False, num_threads: int | None = None) -> dict:
  """CMC, mAP and mINP of a distance matrix under a VI-ReID protocol (see the module docstring).

  distmat: [num_q, num_g], smaller is closer (any array supporting row slicing, e.g. np.memmap).
  q_pids, q_camids: [num_q]; g_pids, g_camids: [num_g] (camera ids unused for "regdb").
  protocol: "sysu" | "regdb" | "llcm".
  chunk_size: query rows per block (default: about 2M matrix elements per block); results do not
    depend on it.
  Returns a dict: "cmc" [max_rank] (the curve the protocol reports: unique-identity for sysu/llcm,
  standard for regdb), "cmc_standard", "cmc_unique", "mAP", "mINP", "num_valid_queries",
  "num_queries", "num_gallery", "max_rank" (cut to the gallery size), "protocol"; with
  return_per_query also "per_query" ([num_q] arrays: valid, ap, inp, first_match_rank, unique_rank).
  """
  if getattr(distmat, "ndim", None) != 2:
    distmat = np.asarray(distmat)
    if distmat.ndim != 2:
      raise ValueError(f"distmat must be 2-D [num_queries, num_gallery], got shape {distmat.shape}")
  num_q, num_g = distmat.shape
  return _evaluate_blocks(lambda sl: np.asarray(distmat[sl]), num_q, num_g, q_pids, g_pids,
                          q_camids, g_camids, protocol, max_rank, chunk_size, return_per_query,
                          num_threads)


def evaluate_features(q_feats: np.ndarray, g_feats: np.ndarray, q_pids, g_pids, q_camids=None,
                      g_camids=None, protocol: str = "sysu", max_rank: int = 20,
                      metric: str = "cosine", chunk_size: int | None = None,
                      return_per_query: bool = False, num_threads: int | None = None) -> dict:
  """`evaluate` on distances computed block by block from features, for galleries too large for
  one query x gallery matrix: only [chunk_size, num_g] distances exist at a time.

  q_feats: [num_q, d], g_feats: [num_g, d]; metric as in `pairwise_distance`.
  """
  q = np.asarray(q_feats, np.float32)
  g = np.asarray(g_feats, np.float32)
  if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
    raise ValueError(f"features must be [num_q, d] and [num_g, d], got {q.shape} and {g.shape}")
  if metric == "cosine":  # normalise once, not per block; same rounding as cosine_distance
    q, g = _normalise_rows(q), _normalise_rows(g)
    block = lambda sl: np.float32(1.0) - q[sl] @ g.T
  else:
    block = lambda sl: pairwise_distance(q[sl], g, metric)
  return _evaluate_blocks(block, q.shape[0], g.shape[0],
                          q_pids, g_pids, q_camids, g_camids, protocol, max_rank, chunk_size,
                          return_per_query, num_threads)
