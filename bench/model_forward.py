"""Parameter counts of the CLIP towers and the forward time of the EEES RN50 image tower.

  python -m bench.model_forward [--batch 8] [--height 288] [--width 144] [--runs 5] [--no_write]

RN50 (2 modality stems, last stride 1, 288x144 input: 18x9 map), ViT-B/16 and the text tower are
built at full size; their parameters are random (filled with numpy: the timing does not depend on
the values, and no checkpoint is needed). Times: jit-compiled forward (eval mode), median of
`runs` runs after one warm-up run, in float32 and bfloat16 compute.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._report import machine_description, write_section
from bench._timing import call_seconds
from eees_jax.models.clip_resnet import ModifiedResNet
from eees_jax.models.clip_text import TextTransformer
from eees_jax.models.clip_vit import VisionTransformer


def random_variables(module, *args, seed: int = 0):
  """Variables with the module's shapes, filled by numpy (avoids compiling JAX's RNG)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "var" in name:
      return np.ones(s.shape, s.dtype)
    return (rng.standard_normal(s.shape) * 0.02).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def time_forward(module, variables, x, modality, runs: int) -> tuple[float, float]:
  """(compile seconds, median run seconds)."""
  fn = jax.jit(lambda v, x, m: module.apply(v, x, m, train=False))
  t = time.perf_counter()
  jax.block_until_ready(fn(variables, x, modality))
  compile_s = time.perf_counter() - t
  return compile_s, statistics.median(call_seconds(lambda: fn(variables, x, modality), runs)[0])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--height", type=int, default=288)
  parser.add_argument("--width", type=int, default=144)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--no_write", action="store_true", help="print only, leave BENCHMARKS.md")
  args = parser.parse_args(argv)

  b, h, w = args.batch, args.height, args.width
  x = jnp.asarray(np.random.default_rng(1).standard_normal((b, h, w, 3)), jnp.float32)
  modality = jnp.asarray(np.arange(b) % 2, jnp.int32)
  rn50 = ModifiedResNet(last_stride=1)  # CLIP RN50 defaults, 2 modality stems.
  rn_vars = random_variables(rn50, x, modality)
  rn_plain = ModifiedResNet(num_modalities=1)
  plain_params = jax.eval_shape(lambda: rn_plain.init(jax.random.key(0), x[:1]))["params"]
  vit = VisionTransformer()
  vit_params = jax.eval_shape(lambda: vit.init(jax.random.key(0), x[:1], modality[:1]))["params"]
  text = TextTransformer()
  text_params = jax.eval_shape(
      lambda: text.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))["params"]

  counts = [
      ("CLIP RN50 image tower (1 stem, as in CLIP)", count(plain_params)),
      ("RN50, 2 modality stems (EEES)", count(rn_vars["params"])),
      ("CLIP ViT-B/16 image tower, 2 patch embeddings", count(vit_params)),
      ("CLIP text tower (width 512, 12 layers)", count(text_params)),
  ]
  rows = []
  out_shape = None
  for name, dtype in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]:
    module = ModifiedResNet(last_stride=1, dtype=dtype)
    compile_s, median_s = time_forward(module, rn_vars, x, modality, args.runs)
    rows.append((name, compile_s, median_s))
    if out_shape is None:
      out = module.apply(rn_vars, x[:1], modality[:1])
      out_shape = (tuple(out["map"].shape[1:]), tuple(out["pooled"].shape[1:]))
    print(f"{name}: compile {compile_s:.1f} s, median {median_s * 1e3:.0f} ms", flush=True)

  try:
    load = f"{os.getloadavg()[0]:.1f}"
  except OSError:
    load = "unknown"
  lines = [
      "## Model forward (CLIP towers)",
      "",
      f"Command: `python -m bench.model_forward --batch {b} --height {h} --width {w} "
      f"--runs {args.runs}`  ",
      f"Machine: {machine_description()}; load average {load} before the timings (shared "
      "machine)",
      "",
      "| tower | parameters |",
      "| --- | ---: |",
      *[f"| {n} | {c:,} |" for n, c in counts],
      "",
      f"RN50 forward, 2 modality stems (both run on the whole batch), last stride 1, input "
      f"{h}x{w}, batch {b} (half visible, half infrared), eval mode, jit; map "
      f"{out_shape[0]}, pooled {out_shape[1]}. Median of {args.runs} runs after one warm-up run.",
      "",
      "| compute dtype | compile + first run (s) | median forward (ms) | images/s |",
      "| --- | ---: | ---: | ---: |",
      *[f"| {n} | {c:.1f} | {m * 1e3:.0f} | {b / m:.1f} |" for n, c, m in rows],
  ]
  markdown = "\n".join(lines)
  print(markdown)
  if not args.no_write:
    write_section("model_forward", markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main())
