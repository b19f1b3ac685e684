"""3x3 convolutions on small feature maps: lax.conv_general_dilated against layers.patch_matmul.

  python -m bench.small_conv [--batch 96 --channels 128 --calls 20 --no_write]

XLA swaps the operands of a convolution whose feature map has fewer positions than its kernel (the
synthetic model's last stage, 4x2 under 3x3) and runs the result far slower than the same products
as one matmul. Per map size: milliseconds of one jitted forward + backward (gradients of both
operands of sum(conv(x, k)^2)) with the project's XLA:CPU options (Eigen convolutions), with
YNNPACK convolutions, and as `patch_matmul`; and which form `layers.conv2d` picks. Writes the
`small_conv` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench._report import machine_description, write_section
from bench._timing import median_ms
from eees_jax import xla_cpu
from eees_jax.models import layers

MAPS = ((4, 2), (2, 4), (3, 3), (5, 2), (4, 4), (8, 4), (16, 8))


def _lax_conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _patch(x, k):
  return layers.patch_matmul(x, k, (1, 1), ((1, 1), (1, 1)))


def time_grad(f, x, k, convolutions: str, calls: int) -> float:
  """Median ms of the jitted forward + backward, compiled with the project's options and the given
  convolution path."""
  previous = os.environ.get(xla_cpu.ENV_CONVOLUTIONS)
  os.environ[xla_cpu.ENV_CONVOLUTIONS] = convolutions
  try:
    g = jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), argnums=(0, 1)),
                compiler_options=xla_cpu.compiler_options())
    jax.block_until_ready(g(x, k))
  finally:
    if previous is None:
      os.environ.pop(xla_cpu.ENV_CONVOLUTIONS)
    else:
      os.environ[xla_cpu.ENV_CONVOLUTIONS] = previous
  return median_ms(lambda: g(x, k), calls)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=96)
  p.add_argument("--channels", type=int, default=128)
  p.add_argument("--calls", type=int, default=20)
  p.add_argument("--no_write", action="store_true")
  args = p.parse_args()
  rng = np.random.default_rng(0)
  k = jnp.asarray(0.05 * rng.standard_normal((3, 3, args.channels, args.channels)), jnp.float32)
  rows = []
  for h, w in MAPS:
    x = jnp.asarray(rng.standard_normal((args.batch, h, w, args.channels)), jnp.float32)
    eigen = time_grad(_lax_conv, x, k, "eigen", args.calls)
    ynn = time_grad(_lax_conv, x, k, "ynnpack", args.calls)
    patch = time_grad(_patch, x, k, "eigen", args.calls)
    picks = "patch_matmul" if layers.takes_patch_matmul((h, w), (3, 3)) else "lax"
    rows.append(f"| {h}x{w} | {eigen:.2f} | {ynn:.2f} | {patch:.2f} | {picks} |")
    print(rows[-1], flush=True)
  cmd = (f"python -m bench.small_conv --batch={args.batch} --channels={args.channels} "
         f"--calls={args.calls}")
  md = "\n".join([
      "## Small feature maps: 3x3 convolution against patch_matmul (forward + backward)", "",
      f"`{cmd}` on {machine_description()}. Median ms of {args.calls} calls of one jitted forward "
      f"and backward (gradients of input and kernel) of a 3x3, stride-1, padding-1 convolution, "
      f"{args.batch} maps of {args.channels} channels in and out: lax.conv_general_dilated with "
      "the project's XLA:CPU options (Eigen convolutions), the same on YNNPACK convolutions, and "
      "`layers.patch_matmul` (one matmul); the last column is what `layers.conv2d` uses.", "",
      "| map | lax, Eigen (ms) | lax, YNNPACK (ms) | patch_matmul (ms) | conv2d uses |",
      "|---|---|---|---|---|", *rows, ""])
  if not args.no_write:
    write_section("small_conv", md)
  print(md)


if __name__ == "__main__":
  main()
