"""Training input pipeline throughput: images/s of decode + three views + augmentation.

Generates SYSU-MM01-sized JPEGs in a temporary folder (visible crops ~ 250-480 px high, infrared
~ 200-330 px), then times `train_dataset` at 288x144 with P=8, K=4 (96 images a step) with and
without the decoded cache, on 1 and 2 threads, and writes the "input_pipeline" section of
BENCHMARKS.md.

  python -m bench.input_pipeline [--images 2000] [--steps 100]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image

from bench._report import machine_description, write_section
from data_pipelines import input_pipeline
from data_pipelines.records import INFRARED, VISIBLE, ImageRecord, TrainSet


def make_sysu_like(root: str, num_images: int, seed: int = 0) -> TrainSet:
  """num_images JPEGs (2/3 visible, 1/3 infrared, 10 per identity per modality on average)."""
  rng = np.random.default_rng(seed)
  records = []
  num_ids = max(8, num_images // 20)
  for n in range(num_images):
    modality = VISIBLE if n % 3 else INFRARED
    pid = int(rng.integers(num_ids))
    camid = int(rng.choice([1, 2, 4, 5])) if modality == VISIBLE else int(rng.choice([3, 6]))
    height = int(rng.integers(250, 481)) if modality == VISIBLE else int(rng.integers(200, 331))
    width = int(height * rng.uniform(0.35, 0.55))
    # Smooth structure plus sensor noise: JPEG sizes like real pedestrian crops (10-40 kB).
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.int16)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    if modality == INFRARED:
      image = np.repeat(image[:, :, :1], 3, axis=2)
    path = f"cam{camid}/{pid:04d}/{n:05d}.jpg"
    os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
    Image.fromarray(image).save(os.path.join(root, path), quality=95)
    records.append(ImageRecord(path, pid, camid, modality))
  return TrainSet(root, tuple(records), num_ids)


def measure(train_set: TrainSet, *, cache: bool, threads: int, steps: int, warmup: int,
            height: int, width: int) -> tuple[float, float]:
  """(images/s of the stream after warm-up, seconds spent building the cache)."""
  start = time.perf_counter()
  stream = input_pipeline.train_dataset(
      train_set, P=8, K=4, height=height, width=width, seed=0, num_steps=warmup + steps,
      threads=threads, cache_decoded=cache)
  setup = time.perf_counter() - start
  for _ in range(warmup):
    next(stream)
  start = time.perf_counter()
  images = 0
  for batch in stream:
    images += len(batch["images"])
  return images / (time.perf_counter() - start), setup


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=2000)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--height", type=int, default=288)
  parser.add_argument("--width", type=int, default=144)
  parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md")
  args = parser.parse_args(argv)

  rows = []
  with tempfile.TemporaryDirectory() as root:
    train_set = make_sysu_like(root, args.images)
    size_mb = sum(os.path.getsize(os.path.join(root, r.path)) for r in train_set.records) / 1e6
    for cache in (False, True):
      for threads in (1, 2):
        rate, setup = measure(train_set, cache=cache, threads=threads, steps=args.steps,
                              warmup=args.warmup, height=args.height, width=args.width)
        rows.append((cache, threads, rate, setup))
        print(f"cache_decoded={cache} threads={threads}: {rate:.0f} images/s"
              + (f" (cache built in {setup:.1f} s)" if cache else ""), flush=True)

  command = "python -m bench.input_pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
  lines = [
      "## Input pipeline (training: decode + V/Vc/R views + augmentation)",
      "",
      f"`{command.strip()}` on {machine_description()}.",
      "",
      f"{args.images} generated SYSU-sized JPEGs ({size_mb:.0f} MB, visible 250-480 px high, "
      f"infrared 200-330 px), output {args.height}x{args.width}, P=8 K=4 (96 images a step), "
      f"{args.steps} timed steps after {args.warmup} warm-up steps. `threads` sets the parallel "
      "decode/augment calls and tf.data's private thread pool; the sampler's generator thread and "
      "the consumer run beside them. Cache build: decoding every image once before the first step.",
      "",
      "| cache_decoded | threads | images/s | cache build (s) |",
      "|---|---|---|---|",
  ]
  for cache, threads, rate, setup in rows:
    lines.append(f"| {cache} | {threads} | {rate:.0f} | {f'{setup:.1f}' if cache else '-'} |")
  if not args.no_write:
    write_section("input_pipeline", "\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
