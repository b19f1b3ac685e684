"""Speed of eees_jax.evaluation.metrics against loop implementations, and its scaling.

  python -m bench.eval_speed            # writes the "eval_speed" section of BENCHMARKS.md

1. SYSU-MM01-sized problem (3803 infrared queries x 301 visible gallery images, 10 gallery draws,
   protocol "sysu") and a RegDB-sized one (2060 x 2060, protocol "regdb"): the vectorised
   `metrics.evaluate` against
   - the loop oracle of tests/test_metrics.py (a Python loop over queries and ranked lists,
     written independently of metrics.py), and
   - a per-query NumPy loop shaped like the AGW code (NumPy inside the loop over queries),
   in the same run, asserting the same numbers; plus, as evidence of where the vectorised time
   goes, the row-wise sort of one int32 key block of the same shape and one read pass over a
   distance matrix, timed alone.
2. Scaling with the gallery size (1k, 10k, 100k images, 3803 queries) through
   `metrics.evaluate_features`, which never holds more than one block of query rows x gallery:
   time and peak Python-heap memory (tracemalloc, which sees NumPy's buffers).
Distances are computed before the timers start in part 1 (all methods get the same matrix).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
import tracemalloc

import numpy as np

from bench._report import machine_description, write_section
from bench._timing import call_seconds
from eees_jax.evaluation import metrics

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_oracle():
  """agw_loop_oracle from tests/test_metrics.py (loaded by path: tests/ is not a package)."""
  spec = importlib.util.spec_from_file_location("_eval_oracle",
                                                os.path.join(_ROOT, "tests", "test_metrics.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.agw_loop_oracle


def numpy_query_loop(distmat, q_pids, g_pids, q_camids=None, g_camids=None, protocol="sysu",
                     max_rank=20) -> dict:
  """A loop over queries with NumPy inside each query (the structure of the AGW code)."""
  num_q, num_g = distmat.shape
  max_rank = min(max_rank, num_g)
  indices = np.argsort(distmat, axis=1, kind="stable")
  ranked_pids = g_pids[indices]
  ranked_cams = g_camids[indices] if g_camids is not None else None
  std_rows, uniq_rows, aps, inps = [], [], [], []
  for i in range(num_q):
    pids = ranked_pids[i]
    if protocol == "sysu" and q_camids[i] == 3:
      pids = pids[ranked_cams[i] != 2]
    elif protocol == "llcm":
      pids = pids[~((pids == q_pids[i]) & (ranked_cams[i] == q_camids[i]))]
    _, first = np.unique(pids, return_index=True)
    hit = np.cumsum(pids[np.sort(first)] == q_pids[i])[:max_rank]
    uniq_rows.append(np.pad(hit, (0, max_rank - len(hit)), mode="edge") if len(hit) else
                     np.zeros(max_rank))
    match = pids == q_pids[i]
    if not match.any():
      continue
    cum = np.cumsum(match)
    pos = np.flatnonzero(match)
    aps.append(np.mean(cum[pos] / (pos + 1.0)))
    inps.append(cum[pos[-1]] / (pos[-1] + 1.0))
    row = np.minimum(cum, 1)[:max_rank]
    std_rows.append(np.pad(row, (0, max_rank - len(row)), mode="edge"))
  n = len(aps)
  std, uniq = np.sum(std_rows, axis=0) / n, np.sum(uniq_rows, axis=0) / n
  return {"cmc": std if protocol == "regdb" else uniq, "cmc_standard": std, "cmc_unique": uniq,
          "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "num_valid_queries": n}


def _same(a: dict, b: dict, what: str) -> None:
  assert a["num_valid_queries"] == b["num_valid_queries"], what
  for k in ("cmc", "cmc_standard", "cmc_unique"):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12, err_msg=f"{what}: {k}")
  for k in ("mAP", "mINP"):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12, err_msg=f"{what}: {k}")


def _features(pids: np.ndarray, num_ids: int, dim: int, noise: float, rng) -> np.ndarray:
  """Identity prototype + noise: a model of middling quality (Rank-1 well below 100)."""
  protos = np.random.default_rng(12345).standard_normal((num_ids, dim)).astype(np.float32)
  return protos[pids] + noise * rng.standard_normal((len(pids), dim)).astype(np.float32)


NOISE = 2.2  # feature noise: Rank-1 around 50-60 % on the SYSU-sized problem


def sysu_problem(trial: int, num_ids: int = 96, dim: int = 256):
  """3803 infrared queries (cameras 3, 6) and a 301-image visible gallery drawn per trial (one
  image per identity and camera 1, 2, 4, 5, 83 identity-camera pairs absent), gallery sorted by
  identity like the AGW lists."""
  rng = np.random.default_rng(1000)
  q_pids = np.sort(rng.integers(0, num_ids, 3803))
  q_cams = rng.choice([3, 6], 3803)
  q_feats = _features(q_pids, num_ids, dim, NOISE, rng)
  pairs = np.array([(p, c) for p in range(num_ids) for c in (1, 2, 4, 5)])
  keep = np.sort(np.random.default_rng(7).choice(len(pairs), 301, replace=False))
  g_pids, g_cams = pairs[keep, 0], pairs[keep, 1]
  g_feats = _features(g_pids, num_ids, dim, NOISE, np.random.default_rng(trial))
  return metrics.cosine_distance(q_feats, g_feats), q_pids, g_pids, q_cams, g_cams


def regdb_problem(num_ids: int = 206, per_id: int = 10, dim: int = 256):
  rng = np.random.default_rng(2000)
  pids = np.repeat(np.arange(num_ids), per_id)
  dist = metrics.cosine_distance(_features(pids, num_ids, dim, NOISE, rng),
                                 _features(pids, num_ids, dim, NOISE, rng))
  return dist, pids, pids, None, None


def _time(fn, repeats: int) -> tuple[float, object]:
  times, out = call_seconds(fn, repeats)
  return statistics.median(times), out


def compare(name: str, problems: list, protocol: str, oracle, repeats: int,
            loop_repeats: int) -> dict:
  def run(f):
    return [f(d, qp, gp, qc, gc, protocol=protocol) for d, qp, gp, qc, gc in problems]
  run(metrics.evaluate)  # warm-up
  t_vec, vec = _time(lambda: run(metrics.evaluate), repeats)
  t_oracle, ref = _time(lambda: run(oracle), loop_repeats)
  t_np, np_loop = _time(lambda: run(numpy_query_loop), loop_repeats)
  for i, (a, b, c) in enumerate(zip(vec, ref, np_loop)):
    _same(a, b, f"{name} problem {i}: vectorised vs oracle")
    _same(c, b, f"{name} problem {i}: NumPy loop vs oracle")
  r = {"name": name, "vec": t_vec, "oracle": t_oracle, "numpy_loop": t_np,
       "mAP": float(np.mean([v["mAP"] for v in vec])),
       "rank1": float(np.mean([v["cmc"][0] for v in vec]))}
  print(f"{name}: vectorised {t_vec * 1e3:.1f} ms, loop oracle {t_oracle:.2f} s "
        f"({t_oracle / t_vec:.0f}x), NumPy query loop {t_np:.2f} s ({t_np / t_vec:.0f}x); "
        f"mean Rank-1 {100 * r['rank1']:.2f}, mAP {100 * r['mAP']:.2f} (same in all three)",
        flush=True)
  return r


def floor_costs(problems: list, repeats: int) -> dict:
  """Seconds for all problems of (a) the row-wise sort of an int32 array shaped like one distance
  matrix (the fast path sorts one such block of 32-bit keys per problem) and (b) one read pass
  (min) over each distance matrix: the parts of `evaluate` no rewrite of the rest can remove."""
  keys = [d.view(np.int32) for d, *_ in problems]  # non-negative floats order as their int bits

  def sort_all():
    for k in keys:
      k.copy().sort(axis=1)

  def copy_all():
    for k in keys:
      k.copy()

  t_sort = _time(sort_all, repeats)[0] - _time(copy_all, repeats)[0]
  t_pass = _time(lambda: [d.min() for d, *_ in problems], repeats)[0]
  return {"sort": t_sort, "pass": t_pass}


def scaling(gallery_sizes, num_q: int = 3803, dim: int = 128, num_ids: int = 500) -> list[dict]:
  rng = np.random.default_rng(3000)
  q_pids = rng.integers(0, num_ids, num_q)
  q_feats = _features(q_pids, num_ids, dim, 1.6, rng)
  q_cams = rng.choice([3, 6], num_q)
  rows = []
  for size in gallery_sizes:
    g_pids = np.sort(rng.integers(0, num_ids, size))
    g_feats = _features(g_pids, num_ids, dim, 1.6, rng)
    g_cams = rng.choice([1, 2, 4, 5], size)
    chunk = max(1, metrics.DEFAULT_BLOCK_ELEMENTS // size)
    tracemalloc.start()
    t = time.perf_counter()
    res = metrics.evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams,
                                    protocol="sysu", chunk_size=chunk)
    elapsed = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rows.append({"gallery": size, "seconds": elapsed, "peak_mb": peak / 2**20, "chunk": chunk,
                 "full_mb": num_q * size * 4 / 2**20, "mAP": res["mAP"]})
    print(f"gallery {size}: {elapsed:.2f} s, peak {peak / 2**20:.0f} MiB (chunk {chunk} rows; a "
          f"full float32 distance matrix would be {num_q * size * 4 / 2**20:.0f} MiB)", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=31, help="median over repeats (vectorised)")
  parser.add_argument("--loop_repeats", type=int, default=3, help="median over repeats (loops)")
  parser.add_argument("--gallery_sizes", default="1000,10000,100000")
  parser.add_argument("--no_write", action="store_true", help="do not touch BENCHMARKS.md")
  args = parser.parse_args()
  oracle = _load_oracle()
  load_before = os.getloadavg()[0]

  sysu_problems = [sysu_problem(t) for t in range(args.trials)]
  sysu = compare(f"SYSU-sized, {args.trials} trials", sysu_problems, "sysu", oracle, args.repeats,
                 args.loop_repeats)
  floor = floor_costs(sysu_problems, args.repeats)
  regdb = compare("RegDB-sized", [regdb_problem()], "regdb", oracle, args.repeats,
                  args.loop_repeats)
  load_after = os.getloadavg()[0]
  scale = scaling([int(s) for s in args.gallery_sizes.split(",")])
  print(f"SYSU-sized: row-wise int32 sort alone {floor['sort'] * 1e3:.1f} ms, one read pass "
        f"{floor['pass'] * 1e3:.2f} ms (all trials); 1-minute load average "
        f"{load_before:.2f} before, {load_after:.2f} after", flush=True)

  lines = [
      "Vectorised `eees_jax.evaluation.metrics.evaluate` against two loop implementations on the "
      "same distance matrices, asserting identical results (CMC, mAP, mINP to 1e-12): the loop "
      "oracle of tests/test_metrics.py (Python loop over queries and ranked lists) and a "
      "per-query NumPy loop shaped like the AGW code. Vectorised time: median of "
      f"{args.repeats} runs after a warm-up; loops: median of {args.loop_repeats} runs. Distance "
      "computation not timed here. The machine is shared: 1-minute load average "
      f"{load_before:.2f} before and {load_after:.2f} after these timings (2 cores).",
      "",
      "| Problem | Vectorised | Loop oracle | Speed-up | NumPy per-query loop | Speed-up |",
      "|---|---|---|---|---|---|",
  ]
  for r in (sysu, regdb):
    lines.append(f"| {r['name']} | {r['vec'] * 1e3:.1f} ms | {r['oracle']:.2f} s | "
                 f"{r['oracle'] / r['vec']:.0f}x | {r['numpy_loop']:.2f} s | "
                 f"{r['numpy_loop'] / r['vec']:.0f}x |")
  ratio = sysu["oracle"] / sysu["vec"]
  per_trial = sysu["vec"] / args.trials * 1e3
  sort_ms, pass_ms = floor["sort"] / args.trials * 1e3, floor["pass"] / args.trials * 1e3
  lines += [
      "",
      f"Target (at least 100x the loop oracle on the SYSU-sized problem): "
      f"{'met' if ratio >= 100 else 'not met'} ({ratio:.0f}x). Where a SYSU-sized trial's "
      f"{per_trial:.2f} ms go: the row-wise sort of the 3803 x 301 block of 32-bit keys takes "
      f"{sort_ms:.2f} ms alone ({100 * sort_ms / per_trial:.0f}%; NumPy's SIMD sort, which is "
      "twice as fast on rows of at most 256 keys), and one read pass over the block "
      f"{pass_ms:.2f} ms; `evaluate` makes seven such element-wise passes (min, max, two to "
      "quantise, shift, gather and OR of the index bits); the rest is work per kept true match "
      "(a binary search of each of the ~10k true-match keys in its sorted row, AP/INP "
      "arithmetic, the unique-identity window of the first 40 ranks) and fixed overheads. Rows "
      "where a true match shares its "
      "quantisation level with a ranked neighbour (0 to 2 of the 3803 rows per trial here) are "
      "ranked again with 64-bit keys.",
  ]
  lines += [
      "",
      "Scaling with the gallery (3803 queries, 128-d features, protocol sysu, "
      "`evaluate_features` in blocks of about 2M query x gallery elements; time includes the "
      "cosine distances, a BLAS matrix product that slows down most when other processes load the "
      "machine; galleries over 4096 images are ranked with 64-bit keys; peak = tracemalloc peak "
      "of the call):",
      "",
      "| Gallery | Time | Peak memory | Block (query rows) | Full distance matrix would be |",
      "|---|---|---|---|---|",
  ]
  for r in scale:
    lines.append(f"| {r['gallery']:,} | {r['seconds']:.2f} s | {r['peak_mb']:.0f} MiB | "
                 f"{r['chunk']} | {r['full_mb']:.0f} MiB |")
  lines += ["", f"Command: `python -m bench.eval_speed`. Machine: {machine_description()}."]
  markdown = "## Evaluation speed (eval_speed)\n\n" + "\n".join(lines)
  print(markdown)
  if not args.no_write:
    write_section("eval_speed", markdown)


if __name__ == "__main__":
  main()
