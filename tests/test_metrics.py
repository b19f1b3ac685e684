"""Tests of eees_jax.evaluation.metrics against a loop oracle and hand-computed cases.

`agw_loop_oracle` is an independent transcription, one query at a time, of the evaluation functions
of the AGW code base (eval_sysu, eval_regdb) and of the DEEN code base (eval_llcm), with the two
conventions the module documents: a stable ranking (ties by gallery index) and CMC rows shorter than
max_rank padded with their last value. bench/eval_speed.py imports it as its timing baseline.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from eees_jax.evaluation import metrics


def _pad(row: list, length: int) -> list:
  """A CMC row cut or padded (with its last value, or 0 when empty) to `length`."""
  row = list(row[:length])
  return row + [row[-1] if row else 0] * (length - len(row))


def agw_loop_oracle(distmat, q_pids, g_pids, q_camids=None, g_camids=None, protocol="sysu",
                    max_rank=20) -> dict:
  """Plain Python loop over queries and over each query's ranked list; returns cmc, cmc_standard,
  cmc_unique, mAP, mINP, num_valid_queries like metrics.evaluate."""
  distmat = np.asarray(distmat)
  num_q, num_g = distmat.shape
  max_rank = min(max_rank, num_g)
  indices = np.argsort(distmat, axis=1, kind="stable").tolist()  # ties: lower gallery index first
  q_pids, g_pids = np.asarray(q_pids).tolist(), np.asarray(g_pids).tolist()
  if protocol != "regdb":
    q_camids, g_camids = np.asarray(q_camids).tolist(), np.asarray(g_camids).tolist()
  unique_rows, standard_rows, all_ap, all_inp = [], [], [], []
  for i in range(num_q):
    q_pid = q_pids[i]
    kept = []  # identities of the ranked gallery after the protocol's removals
    for j in indices[i]:
      if protocol == "sysu" and q_camids[i] == 3 and g_camids[j] == 2:
        continue  # a camera-3 query never sees camera-2 images, whatever their identity
      if protocol == "llcm" and g_pids[j] == q_pid and g_camids[j] == q_camids[i]:
        continue  # same identity seen by the same camera
      kept.append(g_pids[j])

    # "Unique identity" CMC: the first occurrence of each identity; one row for every query.
    seen, row, hit = set(), [], 0
    for pid in kept:
      if pid not in seen:
        seen.add(pid)
        hit = hit or int(pid == q_pid)
        row.append(hit)
    unique_rows.append(_pad(row, max_rank))

    matches = [int(pid == q_pid) for pid in kept]
    num_rel = sum(matches)
    if num_rel == 0:
      continue  # no true match: out of the standard CMC, mAP and mINP
    hits, precision_sum, last, row = 0, 0.0, -1, []
    for rank, m in enumerate(matches):
      hits += m
      row.append(min(hits, 1))
      if m:
        precision_sum += hits / (rank + 1.0)
        last = rank
    standard_rows.append(_pad(row, max_rank))
    all_ap.append(precision_sum / num_rel)
    all_inp.append(num_rel / (last + 1.0))

  num_valid = len(all_ap)
  assert num_valid > 0
  cmc_standard = np.asarray(standard_rows, np.float64).sum(axis=0) / num_valid
  cmc_unique = np.asarray(unique_rows, np.float64).sum(axis=0) / num_valid  # / valid, as AGW
  return {
      "cmc": cmc_standard if protocol == "regdb" else cmc_unique,
      "cmc_standard": cmc_standard,
      "cmc_unique": cmc_unique,
      "mAP": float(np.mean(all_ap)),
      "mINP": float(np.mean(all_inp)),
      "num_valid_queries": num_valid,
  }


def _assert_same(got: dict, want: dict, rtol: float = 1e-12) -> None:
  assert got["num_valid_queries"] == want["num_valid_queries"]
  for k in ("cmc", "cmc_standard", "cmc_unique"):
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=1e-12, err_msg=k)
  for k in ("mAP", "mINP"):
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=1e-12, err_msg=k)


@pytest.fixture(params=["fast", "coarse", "exact"])
def sort_path(request, monkeypatch):
  """Runs a test with the 32-bit fast ranking path (default); with that path quantising to at
  most 16 levels, so that most true matches share a level with a neighbour (their rows are ranked
  again exactly) and the other rows keep images of one level in index order; and with the 64-bit
  exact path only."""
  if request.param == "coarse":
    monkeypatch.setattr(metrics, "_MAX_LEVEL_BITS", 4)
  if request.param == "exact":
    monkeypatch.setattr(metrics, "_MIN_LEVEL_BITS", 99)
  return request.param


# ---------------------------------------------------------------- hand-computed cases

def test_hand_regdb_gallery_smaller_than_max_rank_and_query_without_match():
  # Query pid 1 ranks the gallery 2, 1, 3, 1, 1: matches at ranks 2, 4, 5.
  dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5],
                   [0.5, 0.4, 0.3, 0.2, 0.1]])
  res = metrics.evaluate(dist, [1, 9], [2, 1, 3, 1, 1], protocol="regdb")
  assert res["num_valid_queries"] == 1 and res["max_rank"] == 5
  np.testing.assert_allclose(res["mAP"], (1 / 2 + 2 / 4 + 3 / 5) / 3)
  np.testing.assert_allclose(res["mINP"], 3 / 5)
  np.testing.assert_allclose(res["cmc"], [0, 1, 1, 1, 1])
  np.testing.assert_allclose(res["cmc_standard"], [0, 1, 1, 1, 1])
  np.testing.assert_allclose(res["cmc_unique"], [0, 1, 1, 1, 1])  # distinct list 2, 1, 3


def test_hand_sysu_camera_rule_and_unique_cmc():
  # Gallery: (pid, cam, distance)
  g = [(1, 2, 0.005), (2, 2, 0.01), (2, 1, 0.1), (1, 1, 0.2), (3, 4, 0.3)]
  g_pids = [p for p, _, _ in g]
  g_cams = [c for _, c, _ in g]
  queries = [(1, 3), (1, 6), (3, 6), (3, 3), (7, 3)]  # the last has no true match
  dist = np.array([[d for _, _, d in g]] * len(queries))
  res = metrics.evaluate(dist, [p for p, _ in queries], g_pids, [c for _, c in queries], g_cams,
                         protocol="sysu")
  # q(1, cam3): every camera-2 image is ignored -> kept 2, 1, 3: rank 2.
  # q(1, cam6): ranked 1, 2, 2, 1, 3: matches at 1 and 4; distinct 1, 2, 3.
  # q(3, cam6): match at 5; distinct identities 1, 2, 3 -> unique rank 3.
  # q(3, cam3): kept 2, 1, 3: rank 3.
  assert res["num_valid_queries"] == 4
  np.testing.assert_allclose(res["mAP"], (1 / 2 + (1 + 2 / 4) / 2 + 1 / 5 + 1 / 3) / 4)
  np.testing.assert_allclose(res["mINP"], (1 / 2 + 2 / 4 + 1 / 5 + 1 / 3) / 4)
  np.testing.assert_allclose(res["cmc_standard"], [1 / 4, 2 / 4, 3 / 4, 3 / 4, 1])
  np.testing.assert_allclose(res["cmc_unique"], [1 / 4, 2 / 4, 1, 1, 1])
  np.testing.assert_allclose(res["cmc"], res["cmc_unique"])
  _assert_same(res, agw_loop_oracle(dist, [p for p, _ in queries], g_pids,
                                    [c for _, c in queries], g_cams, "sysu"))


def test_hand_llcm_same_identity_same_camera_removed():
  # Ranked: (2,c2) (1,c1)x (2,c1) (1,c2) (1,c1)x -> kept 2, 2, 1.
  dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.05]])
  res = metrics.evaluate(dist, [1], [1, 2, 1, 1, 2], [1], [1, 1, 2, 1, 2], protocol="llcm")
  np.testing.assert_allclose(res["mAP"], 1 / 3)
  np.testing.assert_allclose(res["mINP"], 1 / 3)
  np.testing.assert_allclose(res["cmc_standard"], [0, 0, 1, 1, 1])
  np.testing.assert_allclose(res["cmc_unique"], [0, 1, 1, 1, 1])
  np.testing.assert_allclose(res["cmc"], res["cmc_unique"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_ties_ranked_by_gallery_index(dtype, sort_path):
  # Three equal distances: the stable order is 3 (0.1), then 0, 1, 2.
  dist = np.array([[0.5, 0.5, 0.5, 0.1]] * 2, dtype)
  res = metrics.evaluate(dist, [1, 2], [2, 1, 2, 1], protocol="regdb", return_per_query=True)
  # pid 1: ranked 1, 2, 1, 2 -> matches 1, 3; pid 2: matches 2, 4.
  np.testing.assert_allclose(res["per_query"]["ap"], [(1 + 2 / 3) / 2, (1 / 2 + 2 / 4) / 2])
  np.testing.assert_allclose(res["per_query"]["inp"], [2 / 3, 2 / 4])
  np.testing.assert_array_equal(res["per_query"]["first_match_rank"], [0, 1])
  np.testing.assert_array_equal(res["per_query"]["unique_rank"], [0, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_negative_zero_ties_with_zero(dtype, sort_path):
  dist = np.array([[0.0, -0.0, 1.0]], dtype)
  res = metrics.evaluate(dist, [1], [2, 1, 1], protocol="regdb")
  np.testing.assert_allclose(res["cmc_standard"], [0, 1, 1])  # index 0 (pid 2) first


def test_float32_order_down_to_one_ulp_and_across_signs(sort_path):
  base = np.float32(0.75)
  vals = np.array([np.nextafter(base, np.float32(2)), base, np.nextafter(base, np.float32(0)),
                   -base, np.float32(-1e-30)], np.float32)
  # Ascending: -0.75 (pid 1), -1e-30 (pid 2), 0.75 - ulp (pid 3), 0.75 (pid 4), 0.75 + ulp (pid 5).
  res = metrics.evaluate(np.tile(vals, (5, 1)), [1, 2, 3, 4, 5], [5, 4, 3, 1, 2], protocol="regdb",
                         return_per_query=True)
  np.testing.assert_array_equal(res["per_query"]["first_match_rank"], [0, 1, 2, 3, 4])


# ---------------------------------------------------------------- random matrices vs the oracle

def _random_case(rng, num_q, num_g, num_ids, ties, dtype, num_cams=6):
  if ties:  # few distinct values: many exact ties
    dist = rng.integers(-3, 4, size=(num_q, num_g)).astype(dtype) / dtype(4)
  else:
    dist = rng.standard_normal((num_q, num_g)).astype(dtype)
  q_pids = rng.integers(0, num_ids + 2, size=num_q)  # some identities absent from the gallery
  g_pids = rng.integers(0, num_ids, size=num_g)
  q_cams = rng.integers(1, num_cams + 1, size=num_q)
  g_cams = rng.integers(1, num_cams + 1, size=num_g)
  q_pids[0], q_cams[0], g_cams[0] = g_pids[0], 1, 2  # at least one query with a kept true match
  return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("protocol", ["sysu", "regdb", "llcm"])
@pytest.mark.parametrize("shape,num_ids,ties,dtype,max_rank", [
    ((1, 7), 3, False, np.float32, 20),
    ((13, 5), 2, True, np.float32, 20),       # gallery smaller than max_rank
    ((40, 30), 6, True, np.float64, 20),
    ((57, 64), 10, False, np.float64, 20),
    ((64, 90), 15, True, np.float32, 10),
    ((120, 33), 4, False, np.float32, 50),
    ((30, 25), 12, True, np.float16, 20),
])
def test_matches_oracle_on_random_matrices(protocol, shape, num_ids, ties, dtype, max_rank,
                                          sort_path):
  rng = np.random.default_rng(zlib.crc32(repr((protocol, shape, ties)).encode()))
  dist, q_pids, g_pids, q_cams, g_cams = _random_case(rng, *shape, num_ids, ties, dtype)
  got = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol,
                         max_rank=max_rank)
  want = agw_loop_oracle(dist, q_pids, g_pids, q_cams, g_cams, protocol, max_rank)
  assert got["max_rank"] == min(max_rank, shape[1])
  _assert_same(got, want)


@pytest.mark.parametrize("protocol", ["sysu", "llcm"])
def test_values_one_ulp_apart_with_removals_match_oracle(protocol, sort_path):
  # Distances a few ulps apart share a level of the 32-bit fast path: those rows must be ranked
  # exactly (and removed images still last).
  rng = np.random.default_rng(5)
  base = np.float32(0.6)
  steps = rng.integers(-3, 4, size=(48, 40))
  dist = (base + steps * np.spacing(base)).astype(np.float32)
  dist[::7] = rng.random((7, 40)).astype(np.float32)  # some rows without near-ties
  q_pids, g_pids = rng.integers(0, 6, 48), np.sort(rng.integers(0, 6, 40))
  q_cams, g_cams = rng.choice([3, 6, 1], 48), rng.choice([1, 2, 4, 5, 3], 40)
  got = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
  _assert_same(got, agw_loop_oracle(dist, q_pids, g_pids, q_cams, g_cams, protocol))


@pytest.mark.parametrize("protocol", ["sysu", "regdb", "llcm"])
@pytest.mark.parametrize("base", [0.6, 3e5, -2.0])
def test_near_constant_distances_match_oracle(protocol, base, sort_path):
  # Every distance within 3 ulps of `base`: the span is tiny against |base|, where quantising
  # x * scale + (bias - lowest * scale) in float32 would lose the bias (lowest * scale >> 2**24).
  rng = np.random.default_rng(int(base) + 7)
  b = np.float32(base)
  dist = (b + rng.integers(-3, 4, size=(30, 70)) * np.spacing(b)).astype(np.float32)
  dist[-1] = b  # a row of equal distances
  q_pids, g_pids = rng.integers(0, 6, 30), rng.integers(0, 6, 70)  # gallery not grouped
  q_cams, g_cams = rng.choice([3, 6, 1], 30), rng.choice([1, 2, 4, 5, 3], 70)
  q_pids[0], q_cams[0], g_pids[0], g_cams[0] = 1, 1, 1, 4
  got = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
  _assert_same(got, agw_loop_oracle(dist, q_pids, g_pids, q_cams, g_cams, protocol))


@pytest.mark.parametrize("protocol", ["sysu", "llcm"])
def test_extreme_values_match_oracle(protocol, sort_path):
  # Signed zeros, subnormals and values near the float32 limits in one matrix.
  vals = np.array([-3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, 3e38], np.float32)
  rng = np.random.default_rng(11)
  dist = vals[rng.integers(0, len(vals), size=(25, 40))]
  dist[:3] = vals[rng.integers(3, 6, size=(3, 40))]  # rows spanning a few subnormals only
  q_pids, g_pids = rng.integers(0, 5, 25), np.sort(rng.integers(0, 5, 40))
  q_cams, g_cams = rng.choice([3, 6], 25), rng.choice([1, 2, 4, 5], 40)
  q_pids[0], g_pids[0], g_cams[0] = g_pids[0], g_pids[0], 1
  for chunk in (None, 1, 3):
    got = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol,
                           chunk_size=chunk)
    _assert_same(got, agw_loop_oracle(dist, q_pids, g_pids, q_cams, g_cams, protocol))


@pytest.mark.parametrize("lo,hi", [(0.61, 1.3), (-1.0, 1.0), (0.6, 0.6000004), (-3e38, 3e38),
                                   (2.0, 2.0), (1e5, 1e5 + 0.1)])
def test_quantise_is_monotone_and_in_range(lo, hi):
  # The fast path's keys need z = bias + level with 0 <= level <= top - 1 (one exponent) and
  # z non-decreasing in the distance.
  top = (1 << 22) - 1
  x = np.sort(np.concatenate([np.linspace(lo, hi, 5000, dtype=np.float32),
                              np.float32([lo, hi]), np.nextafter(np.float32([lo, hi]), 0)]))
  x = x[(x >= np.float32(lo)) & (x <= np.float32(hi))][None, :]
  z = metrics._quantise(x, float(x.min()), float(x.max()), top)[0].astype(np.float64)
  level = z - float(metrics._ROUNDING_BIAS)
  assert level.min() == 0 and level.max() <= top - 1
  np.testing.assert_array_equal(level, np.round(level))
  assert np.all(np.diff(level) >= 0)
  if hi - lo > 0.5:  # a wide span uses (nearly) all levels
    assert level.max() >= top - 3


def test_quantise_refuses_a_subnormal_span():
  x = np.float32([[0.0, 1e-45, 3e-45]])
  assert metrics._quantise(x, 0.0, float(x.max()), (1 << 22) - 1) is None


def test_sysu_camera_layout_matches_oracle():
  # SYSU-like: infrared queries from cameras 3/6, visible gallery from cameras 1/2/4/5, several
  # images per identity and camera, many ties.
  rng = np.random.default_rng(0)
  q_pids = np.repeat(np.arange(20), 6)
  q_cams = np.tile([3, 3, 3, 6, 6, 6], 20)
  g_pids = np.repeat(np.arange(20), 8)
  g_cams = np.tile([1, 1, 2, 2, 4, 4, 5, 5], 20)
  dist = np.round(rng.random((len(q_pids), len(g_pids))), 2).astype(np.float32)
  got = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol="sysu")
  _assert_same(got, agw_loop_oracle(dist, q_pids, g_pids, q_cams, g_cams, "sysu"))


@pytest.mark.parametrize("protocol", ["sysu", "regdb", "llcm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunked_equals_unchunked(protocol, dtype, sort_path):
  rng = np.random.default_rng(1)
  dist, q_pids, g_pids, q_cams, g_cams = _random_case(rng, 53, 41, 8, True, dtype)
  full = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol,
                          chunk_size=10**6, return_per_query=True)
  for chunk in (1, 4, 17):
    part = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol=protocol,
                            chunk_size=chunk, return_per_query=True)
    for k in ("cmc", "cmc_standard", "cmc_unique"):
      np.testing.assert_array_equal(part[k], full[k])
    assert part["mAP"] == full["mAP"] and part["mINP"] == full["mINP"]
    for k, v in full["per_query"].items():
      np.testing.assert_array_equal(part["per_query"][k], v)


def test_evaluate_features_equals_evaluate_on_cosine_distances():
  rng = np.random.default_rng(2)
  qf = rng.standard_normal((37, 16)).astype(np.float32)
  gf = rng.standard_normal((45, 16)).astype(np.float32)
  q_pids, g_pids = rng.integers(0, 9, 37), rng.integers(0, 9, 45)
  q_cams, g_cams = rng.integers(1, 7, 37), rng.integers(1, 7, 45)
  want = agw_loop_oracle(metrics.cosine_distance(qf, gf), q_pids, g_pids, q_cams, g_cams, "sysu")
  for chunk in (None, 5):
    got = metrics.evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, protocol="sysu",
                                    chunk_size=chunk)
    _assert_same(got, want)


def test_distance_helpers_against_formulas():
  rng = np.random.default_rng(3)
  q = rng.standard_normal((4, 5))
  g = rng.standard_normal((6, 5))
  cos = np.array([[1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in g] for a in q])
  euc = np.array([[np.linalg.norm(a - b) for b in g] for a in q])
  np.testing.assert_allclose(metrics.cosine_distance(q, g), cos, atol=1e-6)
  np.testing.assert_allclose(metrics.pairwise_distance(q, g, "cosine"), cos, atol=1e-6)
  np.testing.assert_allclose(metrics.pairwise_distance(q, g, "euclidean"), euc, atol=1e-5)
  np.testing.assert_allclose(metrics.pairwise_distance(q, g, "sqeuclidean"), euc**2, atol=1e-4)
  assert metrics.cosine_distance(q, g).dtype == np.float32
  assert np.all(np.isfinite(metrics.cosine_distance(np.zeros((1, 5)), g)))  # zero rows stay finite


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_non_contiguous_distance_matrix_matches_oracle(layout, sort_path):
  rng = np.random.default_rng(21)
  dist = rng.random((50, 80)).astype(np.float32)
  dist = np.asfortranarray(dist[:, :40]) if layout == "fortran" else dist[:, ::2]
  q_pids, g_pids = rng.integers(0, 5, 50), rng.integers(0, 5, 40)
  q_cams, g_cams = rng.choice([3, 6], 50), rng.choice([1, 2, 4, 5], 40)
  got = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol="sysu")
  _assert_same(got, agw_loop_oracle(dist, q_pids, g_pids, q_cams, g_cams, "sysu"))


def test_memmap_input(tmp_path):
  rng = np.random.default_rng(4)
  dist, q_pids, g_pids, q_cams, g_cams = _random_case(rng, 25, 19, 5, False, np.float32)
  mm = np.memmap(tmp_path / "d.bin", dtype=np.float32, mode="w+", shape=dist.shape)
  mm[:] = dist
  got = metrics.evaluate(mm, q_pids, g_pids, q_cams, g_cams, protocol="llcm", chunk_size=6)
  _assert_same(got, agw_loop_oracle(dist, q_pids, g_pids, q_cams, g_cams, "llcm"))


def test_errors_are_clear():
  d = np.zeros((2, 3))
  with pytest.raises(ValueError, match="needs q_camids"):
    metrics.evaluate(d, [1, 2], [1, 2, 3], protocol="sysu")
  with pytest.raises(ValueError, match="protocol"):
    metrics.evaluate(d, [1, 2], [1, 2, 3], protocol="market")
  with pytest.raises(ValueError, match="row 1 has non-finite"):
    metrics.evaluate(np.array([[0, 1, 2], [0, np.nan, 1]]), [1, 2], [1, 2, 3], protocol="regdb")
  with pytest.raises(ValueError, match="no query has a true match"):
    metrics.evaluate(d, [7, 8], [1, 2, 3], protocol="regdb")
  with pytest.raises(ValueError, match="g_pids"):
    metrics.evaluate(d, [1, 2], [1, 2], protocol="regdb")
  with pytest.raises(ValueError, match="chunk_size"):
    metrics.evaluate(d, [1, 2], [1, 2, 3], protocol="regdb", chunk_size=0)
