"""Training-mode BatchNorm on the synthetic model's maps: sums as reductions against layers'
matrix-vector form.

  python -m bench.batch_norm [--batch 96 --calls 50 --no_write]

XLA:CPU rewrites a reduction over many elements into a reduce-window tree, and the BatchNorm
statistics (forward) and the scale, bias and statistics gradients (backward) are such reductions.
`layers.batch_norm_train` writes both directions' sums as matrix-vector products. Per map (the
stem, layer1, layer2 and layer4 outputs of configs/synthetic.py's tower at 64x32): milliseconds of
one jitted forward + backward (gradients of the input, scale and bias of sum(BN(x) * g), g fixed
and random) with the project's XLA:CPU options, for flax.linen.BatchNorm (what the bottleneck
blocks used before), the same formula as plain jnp reductions, and `layers.MaskedBatchNorm`
(every BatchNorm of the ResNet tower now). Writes the `batch_norm` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bench._report import machine_description, write_section
from bench._timing import median_ms
from eees_jax import xla_cpu
from eees_jax.models import layers

MAPS = ((32, 16, 16), (16, 8, 64), (8, 4, 128), (4, 2, 512))  # (H, W, C) of the synthetic tower


def _reductions(x, scale, bias):
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _train_mode(bn):
  """f(x, scale, bias): the module's training-mode output, fresh running statistics."""
  def f(x, scale, bias):
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
    return bn.apply(variables, x, mutable=["batch_stats"])[0]
  return f


_flax = _train_mode(nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5))
_ours = _train_mode(layers.MaskedBatchNorm(use_running_average=False))


def time_grad(f, x, scale, bias, calls: int) -> float:
  """Median ms of the jitted forward + backward with the project's XLA:CPU options."""
  cot = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
  g = jax.jit(jax.grad(lambda x, s, b: jnp.sum(f(x, s, b) * cot), argnums=(0, 1, 2)),
              compiler_options=xla_cpu.compiler_options())
  jax.block_until_ready(g(x, scale, bias))
  return median_ms(lambda: g(x, scale, bias), calls)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=96)
  p.add_argument("--calls", type=int, default=50)
  p.add_argument("--no_write", action="store_true")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  for h, w, c in MAPS:
    x = jnp.asarray(rng.standard_normal((args.batch, h, w, c)) * 2 + 1, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(c), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    times = [time_grad(f, x, scale, bias, args.calls) for f in (_flax, _reductions, _ours)]
    rows.append(f"| {h}x{w}x{c} | " + " | ".join(f"{t:.2f}" for t in times)
                + f" | {times[0] / times[2]:.2f} |")
    print(rows[-1], flush=True)
  cmd = f"python -m bench.batch_norm --batch={args.batch} --calls={args.calls}"
  md = "\n".join([
      "## Batch statistics: training-mode BatchNorm, reductions against matrix-vector products "
      "(forward + backward)", "",
      f"`{cmd}` on {machine_description()}. Median ms of {args.calls} calls of one jitted forward "
      f"and backward (gradients of input, scale and bias) of a training-mode BatchNorm over "
      f"{args.batch} maps: flax.linen.BatchNorm, the same formula with jnp reductions, and "
      "`layers.MaskedBatchNorm` (`layers.batch_norm_train`: statistics and gradient sums as "
      "matrix-vector products, the backward written out); the last column is flax's time over "
      "MaskedBatchNorm's.", "",
      "| map (HxWxC) | flax BatchNorm (ms) | jnp reductions (ms) | MaskedBatchNorm (ms) | "
      "flax / MaskedBatchNorm |",
      "|---|---|---|---|---|", *rows, ""])
  if not args.no_write:
    write_section("batch_norm", md)
  print(md)


if __name__ == "__main__":
  main()
