"""Query latency of exact search (eees_jax.exact_search) at 10k, 100k and 1M gallery entries.

  python -m bench.search_latency                      # writes the "search_latency_<platform>"
                                                      # section of BENCHMARKS.md
  python -m bench.search_latency --sizes 10000,100000 --dims 1280 --markdown-out section.md

Galleries are random unit vectors generated on the default device, of the two test-time feature
sizes that matter: 1280 (the synthetic benchmark's model, configs/synthetic.py: 2 x (512 + 128))
and 6144 (CLIP RN50, configs/sysu.py: 2 x (2048 + 1024)). A query is what `eees_jax.search`
runs for one image or sentence: the query row to the device, one jitted step per chunk (fixed chunk
of exact_search.DEFAULT_CHUNK rows, highest matmul precision) merging into a running top k on the
device, the top k back to the host; its time excludes the embedding of the query and the one-off upload of the gallery.
Reported: median and 90th percentile over repeated single queries (after compile-and-warm-up
calls), and the time per query when 64 queries go in one call. A size whose gallery would take
more than --max-memory-fraction of the device's (or, on CPU, the host's) memory is skipped and
listed as such. Results are checked against a direct top k of one full score row.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._report import machine_description, write_section
from bench._timing import call_seconds
from eees_jax import exact_search

K = 20


def _device_memory_bytes() -> int:
  device = jax.devices()[0]
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit:
      return int(limit)
  except Exception:  # CPU devices have no memory_stats
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _random_unit(key, n: int, d: int, block: int = 65536) -> jax.Array:
  """[n, d] random unit rows, generated block by block on the device."""
  @jax.jit
  def make(k):
    x = jax.random.normal(k, (block, d), jnp.float32)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)
  parts = [make(jax.random.fold_in(key, i)) for i in range(-(-n // block))]
  out = jnp.concatenate(parts)[:n] if len(parts) > 1 else parts[0][:n]
  del parts
  return out


def measure(n: int, d: int, repeats: int, batch: int = 64) -> dict:
  key = jax.random.PRNGKey(n + d)
  feats = _random_unit(key, n, d)
  start = time.perf_counter()
  gallery = exact_search.Gallery(feats, chunk_size=exact_search.DEFAULT_CHUNK)
  jax.block_until_ready(gallery.chunks)
  build = time.perf_counter() - start
  rng = np.random.default_rng(0)
  one = rng.normal(size=(1, d)).astype(np.float32)
  many = rng.normal(size=(batch, d)).astype(np.float32)
  # Check: the chunked top k equals a direct top k of the full score row of one query.
  scores, index = gallery.search(one, K)
  q = jnp.asarray(one / np.linalg.norm(one))
  direct = jax.lax.top_k(jnp.matmul(q, feats.T, precision=jax.lax.Precision.HIGHEST), K)
  assert np.allclose(scores, np.asarray(direct[0]), atol=1e-5), "top-k scores differ"
  assert np.array_equal(index, np.asarray(direct[1])), "top-k indices differ"
  del feats, direct
  for _ in range(2):  # compile (first call) and warm up, for both query shapes
    gallery.search(one, K)
    gallery.search(many, K)
  single = call_seconds(lambda: gallery.search(one, K), repeats)[0]
  batched = call_seconds(lambda: gallery.search(many, K), max(3, repeats // 4))[0]
  del gallery
  return {"n": n, "d": d, "build_s": build, "median_ms": 1e3 * statistics.median(single),
          "p90_ms": 1e3 * float(np.percentile(single, 90)),
          "batch_ms_per_query": 1e3 * statistics.median(batched) / batch,
          "repeats": repeats, "gib": n * d * 4 / 2 ** 30}


def _load() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "unknown"


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
  """The command line that reproduces the figures (options that differ from their defaults)."""
  parts = ["python -m bench.search_latency"]
  for action in parser._actions:  # pylint: disable=protected-access
    if action.dest in ("help", "markdown_out", "note"):
      continue
    value = getattr(args, action.dest)
    if value != action.default:
      parts.append(f"{action.option_strings[0]} {value}")
  return " ".join(parts)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="10000,100000,1000000")
  parser.add_argument("--dims", default="1280,6144")
  parser.add_argument("--repeats", type=int, default=30, help="single queries timed per size")
  parser.add_argument("--max-memory-fraction", type=float, default=0.4,
                      help="skip a gallery larger than this fraction of the memory")
  parser.add_argument("--markdown-out", default="",
                      help="write the section here instead of into BENCHMARKS.md")
  parser.add_argument("--note", default="", help="machine state to record with the figures")
  args = parser.parse_args(argv)
  platform = jax.devices()[0].platform
  memory = _device_memory_bytes()
  load_before = _load()
  rows, skipped = [], []
  for d in (int(x) for x in args.dims.split(",")):
    for n in (int(x) for x in args.sizes.split(",")):
      if n * d * 4 * 2 > args.max_memory_fraction * memory:  # gallery + its padded copy
        skipped.append(f"{n:,} x {d}")
        print(f"skip {n} x {d}: {2 * n * d * 4 / 2 ** 30:.1f} GiB needed", flush=True)
        continue
      repeats = args.repeats if n * d < 2e9 or platform != "cpu" else max(5, args.repeats // 6)
      r = measure(n, d, repeats)
      rows.append(r)
      print(f"{n:>9} x {d}: median {r['median_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, "
            f"64-query batch {r['batch_ms_per_query']:.3f} ms/query", flush=True)
  lines = [f"## Search latency ({platform}): exact chunked top-{K}", "",
           f"Command: `{_command(parser, args)}`. "
           f"Machine: {machine_description()}. Load average before the run: {load_before}"
           + (f"; {args.note}" if args.note else "") + ". One run.", "",
           f"One query = query to the device, one jitted step per {exact_search.DEFAULT_CHUNK}-row "
           f"chunk merging into a running top-{K} (float32, highest precision), top-{K} back to the "
           "host; "
           "the query's embedding is not included. Gallery: random unit vectors; results "
           "checked against a direct top-k of the full score row.", "",
           "| gallery | dim | gallery GiB | median ms / query | p90 ms | ms / query, 64 per call |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['n']:,} | {r['d']} | {r['gib']:.2f} | {r['median_ms']:.2f} | "
                 f"{r['p90_ms']:.2f} | {r['batch_ms_per_query']:.3f} |")
  if skipped:
    lines += ["", f"Not run (gallery over {args.max_memory_fraction:.0%} of "
              f"{memory / 2 ** 30:.0f} GiB of memory): {', '.join(skipped)}."]
  markdown = "\n".join(lines)
  if args.markdown_out:
    with open(args.markdown_out, "w") as f:
      f.write(markdown + "\n")
  else:
    write_section(f"search_latency_{platform}", markdown)
  print(markdown)


if __name__ == "__main__":
  main()
