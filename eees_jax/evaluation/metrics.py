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
     stable order. Fast path (float32/float16 distances, galleries up to 4096 images): 32-bit keys
     (quantised distance << b | gallery index, removed images at the top level), then a binary
     search of each kept true match's key in its sorted row gives its rank; the quantisation is
     monotone, so only rows where a true match shares its level with a ranked neighbour can be
     misranked, and those rows are ranked again exactly. Exact path (the rest, and those rows):
     64-bit keys (float bits << 32 | gallery index) or, for other dtypes, a stable argsort; the
     true matches are the ranked positions whose gallery index belongs to the query's identity.
  2. AP, INP and the first-match rank follow from the ranks of the true matches with
     bincount/cumsum arithmetic.
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


@dataclasses.dataclass(frozen=True)
class _Removal:
  """Gallery images the queries of a block ignore under the protocol's rule.

  grid (sysu): every column of `cols` for each row of `rows`; otherwise (llcm) the pairs
  (rows[k], cols[k]). count: [B] images removed from each query's list.
  """
  rows: np.ndarray
  cols: np.ndarray
  grid: bool
  count: np.ndarray

  def index(self) -> tuple[np.ndarray, np.ndarray]:
    """An index selecting the removed entries of the [B, G] block."""
    return np.ix_(self.rows, self.cols) if self.grid else (self.rows, self.cols)

  def of_rows(self, rows: np.ndarray) -> _Removal | None:
    """The removal of the block rows `rows`, renumbered 0..len(rows)-1 (None if nothing is left)."""
    where = np.full(len(self.count), -1)
    where[rows] = np.arange(len(rows))
    new = where[self.rows]
    keep = new >= 0
    if not keep.any():
      return None
    return _Removal(new[keep], self.cols if self.grid else self.cols[keep], self.grid,
                    self.count[rows])


def _matches(protocol: str, q_codes: np.ndarray, q_cams: np.ndarray | None, gal: _Gallery
             ) -> tuple[np.ndarray, np.ndarray, _Removal | None]:
  """The true matches each query keeps, and what it ignores.

  Returns (rows, cols, removal): kept true matches as block row and gallery index pairs (rows
  ascending, gallery index ascending within a row), and the protocol's removal (None if empty).
  """
  num_q = len(q_codes)
  n = np.where(q_codes >= 0, gal.counts[q_codes], 0)
  rows = np.repeat(np.arange(num_q), n)
  offset = np.arange(len(rows)) - np.repeat(np.cumsum(n) - n, n)
  cols = gal.perm[gal.starts[q_codes[rows]] + offset]  # ascending: perm is a stable grouping
  if protocol == "regdb":
    return rows, cols, None
  if protocol == "sysu":  # camera-3 queries x camera-2 gallery images, any identity
    q3 = q_cams == 3
    cam2 = np.nonzero(gal.cams == 2)[0]
    hidden = q3[rows] & (gal.cams[cols] == 2)
    removal = (_Removal(np.nonzero(q3)[0], cam2, True, np.where(q3, len(cam2), 0))
               if q3.any() and len(cam2) else None)
    return rows[~hidden], cols[~hidden], removal
  # llcm: the gallery images of the query's identity seen by the query's camera.
  hidden = gal.cams[cols] == q_cams[rows]
  removal = None
  if hidden.any():
    removal = _Removal(rows[hidden], cols[hidden], False,
                       np.bincount(rows[hidden], minlength=num_q))
  return rows[~hidden], cols[~hidden], removal


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


def _rank_exact(dist: np.ndarray, q_codes: np.ndarray, removal: _Removal | None, gal: _Gallery,
                nonnegative: bool) -> tuple[np.ndarray, np.ndarray, Callable]:
  """Ranks of the kept true matches from a full exact ranking of the block [B, G].

  Returns (rows, ranks, ranked): the kept true matches as (block row, 0-based kept rank), by row
  then rank, and ranked(rows, width) -> gallery indices at ranks 0..width-1 of those rows (width
  None: all ranks).
  """
  num_q, num_g = dist.shape
  index = _index_exact(dist, None if removal is None else removal.index(), nonnegative)
  if gal.grouped:  # identity c owns the gallery indices starts[c] .. starts[c] + counts[c] - 1
    start = np.where(q_codes >= 0, gal.starts[q_codes], 0).astype(np.int32)
    count = np.where(q_codes >= 0, gal.counts[q_codes], 0).astype(np.uint32)
    offset = np.subtract(index, start[:, None], dtype=np.int32)
    match = offset.view(np.uint32) < count[:, None]
    del offset
  else:
    match = gal.codes[index] == q_codes[:, None]
  rows, ranks = np.divmod(np.flatnonzero(match), num_g)  # row-major: by query, then by rank
  del match
  if removal is not None:  # removed images sit at the end of each ranked list
    ok = ranks < num_g - removal.count[rows]
    rows, ranks = rows[ok], ranks[ok]
  return rows, ranks, lambda r, width=None: index[r, :width]


# The 32-bit key path is used when the gallery index leaves at least this many bits for the
# quantised distance (galleries up to 4096 images); at most _MAX_LEVEL_BITS are used (the
# float32 mantissa holds 23; tests lower it to force many shared levels).
_MIN_LEVEL_BITS = 19
_MAX_LEVEL_BITS = 22
_ROUNDING_BIAS = np.float32(1.5 * 2**23)  # x + bias stores round(x) in the low mantissa bits


def _quantise(dist: np.ndarray, lowest: float, highest: float, top: int) -> np.ndarray | None:
  """[B, G] float32 z = bias + level, level = round((x - lowest) * scale) in [0, top - 1] (scale =
  (top - 2) / (highest - lowest)), so that the level sits in the low mantissa bits of z and every z
  has the exponent of bias = 1.5 * 2**23; None when float32 arithmetic cannot guarantee that range.

  Float32 rounding is monotone, so z(lowest) and z(highest), computed with the same float32
  operations as the array, bound every z: the range is checked on those two values. x * scale +
  (bias - lowest * scale) (two passes) loses the bias when |lowest| is large against the span
  (distances a few ulps apart); (x - lowest) * scale + bias (three passes) is then used.
  """
  lo, hi = np.float32(lowest), np.float32(highest)
  span = float(highest) - float(lowest)
  with np.errstate(all="ignore"):  # a subnormal span or overflow fails the range checks below
    scale = np.float32((top - 2) / span) if span > 0 else np.float32(0.0)
    limit = _ROUNDING_BIAS + np.float32(top - 1)
    offset = _ROUNDING_BIAS - lo * scale
    if _ROUNDING_BIAS <= lo * scale + offset and hi * scale + offset <= limit:
      z = np.multiply(dist, scale, dtype=np.float32, order="C")  # C order: callers ravel it
      z += offset
      return z
    if (hi - lo) * scale + _ROUNDING_BIAS <= limit:  # (lowest - lowest) * scale + bias = bias
      z = np.subtract(dist, lo, dtype=np.float32, order="C")
      z *= scale
      z += _ROUNDING_BIAS
      return z
  return None


def _rank_quantised(dist: np.ndarray, m_rows: np.ndarray, m_cols: np.ndarray,
                    removal: _Removal | None, lowest: float, highest: float
                    ) -> tuple[np.ndarray, np.ndarray, Callable, np.ndarray] | None:
  """Fast path: one sort of 32-bit keys (quantised distance << b | gallery index, b index bits),
  then a binary search for each kept true match (m_rows, m_cols) in its sorted row.

  Quantisation (`_quantise`): at most 2**min(_MAX_LEVEL_BITS, 31 - b) levels, taken from the low
  mantissa bits of a float32 (the other bits are the same for every element). It is monotone: a
  lower level means a smaller distance. A true match whose two ranked neighbours have other levels
  is the only image of its level, so it sits at its exact rank and the set of images before it is
  exact (their order among themselves, by level then index, changes no metric: AP, INP and the
  first-match rank depend on match ranks only, the unique-identity rank on the set before the first
  match). Rows with a true match that shares its level with a neighbour are returned for exact
  ranking. Removed images get the top level, above every kept one.
  Returns (rows, ranks, ranked, redo): as `_rank_exact`, plus the row numbers to rank exactly; None
  when the distances cannot be quantised (see `_quantise`).
  """
  num_q, num_g = dist.shape
  bits = max(1, (num_g - 1).bit_length())
  top = (1 << min(_MAX_LEVEL_BITS, 31 - bits)) - 1
  z = _quantise(dist, lowest, highest, top)
  if z is None:
    return None
  keys = z.view(np.int32)
  del z
  keys <<= bits
  col = np.arange(num_g, dtype=np.int32)
  removed_level = np.int32(top << bits)  # OR-ed in: sets every level bit (level = top)
  if removal is not None and removal.grid:  # rows x cols: two variants of the index row
    variants = np.stack([col, col])
    variants[1, removal.cols] |= removed_level
    which = np.zeros(num_q, np.intp)
    which[removal.rows] = 1
    keys |= variants[which]
  else:
    keys |= col
    if removal is not None:
      keys[removal.rows, removal.cols] |= removed_level
  flat = keys.reshape(-1)  # a view (keys is C-contiguous): it follows the in-place sort
  base = m_rows * num_g
  needles = flat.take(base + m_cols)
  keys.sort(axis=1)

  # at = flat position of each needle in its sorted row: a binary search with power-of-two steps
  # (Shar's variant: a first probe at step - 1 decides whether the search continues from the row's
  # start or from G - step, so no probe leaves the row). The needle is in the row exactly once.
  step = 1 << (num_g.bit_length() - 1)
  at = base + np.where(flat.take(base + (step - 1)) < needles, num_g - step, 0)
  step >>= 1
  while step:
    at += (flat.take(at + (step - 1)) < needles) * step
    step >>= 1
  pos = at - base
  level = needles >> bits
  last = base + (num_g - 1)
  shared = (pos > 0) & (flat.take(np.maximum(at - 1, base)) >> bits == level)
  shared |= (pos < num_g - 1) & (flat.take(np.minimum(at + 1, last)) >> bits == level)
  redo = np.unique(m_rows[shared])

  rows, ranks = np.divmod(np.sort(at), num_g)
  mask = np.int32((1 << bits) - 1)
  return rows, ranks, lambda r, width=None: keys[r, :width] & mask, redo


def _distinct_before(codes_ranked: np.ndarray, first: np.ndarray, sentinel: int) -> np.ndarray:
  """Number of distinct identity codes among the first `first[i]` entries of row i of
  codes_ranked [F, W] (positions >= W are not seen)."""
  c = np.where(np.arange(codes_ranked.shape[1]) < first[:, None], codes_ranked, sentinel)
  c.sort(axis=1)
  change = c[:, 1:] != c[:, :-1]
  return (change.sum(axis=1) + 1) - (c[:, -1] == sentinel)


def _per_query(num_q: int, rows: np.ndarray, ranks: np.ndarray, ranked: Callable, gal: _Gallery,
               max_rank: int) -> dict[str, np.ndarray]:
  """Per-query results from the kept true matches (rows, ranks: by row, then rank).

  Returns [B] arrays: n_rel (true matches kept), ap, inp (nan where n_rel == 0), first (0-based kept
  rank of the first true match), unique (0-based rank of the query identity among the distinct kept
  identities, capped at max_rank); first/unique are -1 where n_rel == 0.
  """
  n_rel = np.bincount(rows, minlength=num_q)
  first_idx = np.cumsum(n_rel) - n_rel  # index into rows/ranks of each query's first true match
  k = np.arange(len(rows)) - first_idx[rows]  # 0-based index of a match among its query's matches
  ap_sum = np.bincount(rows, weights=(k + 1.0) / (ranks + 1.0), minlength=num_q)

  vq = np.nonzero(n_rel)[0]
  first = np.full(num_q, -1, np.int64)
  unique = np.full(num_q, -1, np.int64)
  ap = np.full(num_q, np.nan)
  inp = np.full(num_q, np.nan)
  first[vq] = ranks[first_idx[vq]]
  last = ranks[first_idx[vq] + n_rel[vq] - 1]
  ap[vq] = ap_sum[vq] / n_rel[vq]
  inp[vq] = n_rel[vq] / (last + 1.0)

  # Unique-identity rank = distinct identities ranked before the first true match (removed images
  # rank after it): first itself when first < 2. Only min(rank, max_rank) matters: look at a window
  # of the first W ranks, and at the whole list only for the queries the window cannot decide.
  unique[vq] = first[vq]
  vq = vq[first[vq] >= 2]
  if len(vq):
    width = min(gal.size, max(2 * max_rank, 32))
    sentinel = len(gal.unique_pids)
    u = _distinct_before(gal.codes[ranked(vq, width)], first[vq], sentinel)
    undecided = (first[vq] > width) & (u < max_rank)
    if undecided.any():
      rows_u = vq[undecided]
      u[undecided] = _distinct_before(gal.codes[ranked(rows_u)], first[rows_u], sentinel)
    unique[vq] = np.minimum(u, max_rank)
  return dict(n_rel=n_rel, ap=ap, inp=inp, first=first, unique=unique)


def _block(dist: np.ndarray, q_codes: np.ndarray, q_cams: np.ndarray | None, gal: _Gallery,
           protocol: str, max_rank: int, lowest: float, highest: float) -> dict[str, np.ndarray]:
  """Per-query results (see `_per_query`) for one block of rows of the distance matrix [B, G]."""
  num_q, num_g = dist.shape
  m_rows, m_cols, removal = _matches(protocol, q_codes, q_cams, gal)
  nonnegative = lowest >= 0
  fast = None
  if (dist.dtype in (np.float32, np.float16) and num_g >= 2
      and 31 - (num_g - 1).bit_length() >= _MIN_LEVEL_BITS):
    fast = _rank_quantised(dist, m_rows, m_cols, removal, lowest, highest)
  if fast is None:
    return _per_query(num_q, *_rank_exact(dist, q_codes, removal, gal, nonnegative), gal, max_rank)
  rows, ranks, ranked, redo = fast
  out = _per_query(num_q, rows, ranks, ranked, gal, max_rank)
  if len(redo):
    sub_removal = None if removal is None else removal.of_rows(redo)
    exact = _per_query(len(redo), *_rank_exact(dist[redo], q_codes[redo], sub_removal, gal,
                                               nonnegative), gal, max_rank)
    for key, value in exact.items():
      out[key][redo] = value
  return out


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
