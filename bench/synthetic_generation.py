"""Time to generate the built-in synthetic benchmark, and what it contains.

Generates the default set (the settings of configs/synthetic.py unless overridden) into a
temporary folder once per worker count and writes the "synthetic_generation" section of
BENCHMARKS.md.

  python -m bench.synthetic_generation [--num_ids 120] [--images_per_camera 5] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from bench._report import machine_description, write_section
from data_pipelines import synthetic


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_ids", type=int, default=120)
  parser.add_argument("--images_per_camera", type=int, default=5)
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--no_write", action="store_true", help="print only, leave BENCHMARKS.md alone")
  args = parser.parse_args(argv)

  load = os.getloadavg()[0]
  rows, summary = [], None
  for workers in args.workers:
    scratch = tempfile.mkdtemp(prefix="synthetic-bench-")
    try:
      summary = synthetic.generate(os.path.join(scratch, "set"), num_ids=args.num_ids,
                                   images_per_camera=args.images_per_camera, height=args.height,
                                   width=args.width, seed=args.seed, workers=workers)
      size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(scratch) for f in files)
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    rows.append((workers, summary["seconds"], summary["images"] / summary["seconds"], size / 2**20))
    print(f"workers={workers}: {summary['seconds']:.1f} s, {summary['images']} images")

  ids = summary["ids"]
  cams = " | ".join(str(summary["images_per_camera"][c]) for c in synthetic.CAMERAS)
  given = sys.argv[1:] if argv is None else list(argv)
  command = " ".join(["python -m bench.synthetic_generation"] + given)
  lines = [
      "## Synthetic benchmark generation",
      "",
      f"Command: `{command}`  ",
      f"Machine: {machine_description()}; load average {load:.1f} before the run (a shared machine "
      "slows the timings, and a second worker only helps when a core is free)",
      "",
      f"Settings: {args.num_ids} identities, {args.images_per_camera} images per camera, "
      f"{args.height}x{args.width} (HxW), seed {args.seed}.  ",
      f"Identities: {ids['train']} train + {ids['val']} val (training), {ids['test']} test.  ",
      f"Images: {summary['images']} (and as many descriptions).",
      "",
      "| cam1 | cam2 | cam3 (IR) | cam4 | cam5 | cam6 (IR) |",
      "| ---: | ---: | ---: | ---: | ---: | ---: |",
      f"| {cams} |",
      "",
      "| workers | seconds | images/s | size on disk (MiB) |",
      "| ---: | ---: | ---: | ---: |",
  ]
  lines += [f"| {w} | {s:.1f} | {r:.0f} | {m:.1f} |" for w, s, r, m in rows]
  if not args.no_write:
    write_section("synthetic_generation", "\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
