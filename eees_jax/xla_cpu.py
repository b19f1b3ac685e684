"""XLA:CPU compile options for the project's train step (the CPU defaults).

With the pinned jaxlib (0.10.2) XLA:CPU hands convolutions and matmuls to YNNPACK by default. On the
AVX-512 CPU the project was measured on, YNNPACK's 3x3 convolutions ran at about half the speed of
XLA's Eigen path (forward and backward), and the RN50 train step was about 10% faster with both on
Eigen; the memory-optimised HLO schedule lowers the step's buffers (13.4 -> 11.8 GiB with both, at
P=8 K=4) at the same speed. Both compute the same function (results differ by float rounding):
BENCHMARKS.md, sections `xla_cpu_options_float32` and `vs_torch`; `python -m bench.xla_cpu_options`
measures them.

They are passed per compilation (`jax.jit(..., compiler_options=compiler_options())`), not through
XLA_FLAGS: TensorFlow's own XLA reads XLA_FLAGS too and stops on option names it does not know. So
they need a top-level jit: the trainer's step has one; the test-time feature, which export nests in
its own jit, keeps jaxlib's defaults (3-5% slower there; evaluation and inference stay one
program). They apply only to the CPU backend and only with the jaxlib they were measured on (option
names change between releases); EEES_JAX_XLA_CPU_DEFAULTS=0 turns them off.
"""
from __future__ import annotations

import os

import jax
import jaxlib

MEASURED_JAXLIB = "0.10.2"
DEFAULTS = {
    # Empty list: no YNNPACK fusions (the jaxlib's default sends individual dots and convolutions).
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}
ENV_SWITCH = "EEES_JAX_XLA_CPU_DEFAULTS"


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """The options for jax.jit's compiler_options on `backend` (default: JAX's default backend), or
  None (jaxlib's own defaults) off the CPU, with another jaxlib, or with EEES_JAX_XLA_CPU_DEFAULTS=0."""
  if os.environ.get(ENV_SWITCH, "1") == "0":
    return None
  if (backend or jax.default_backend()) != "cpu" or jaxlib.__version__ != MEASURED_JAXLIB:
    return None
  return dict(DEFAULTS)
