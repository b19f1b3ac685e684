"""XLA:CPU compile options for the project's train step (the CPU defaults, and one opt-in).

Default: the memory-optimised HLO schedule. It lowers the RN50 step's buffers (XLA's temporaries
13.4 -> 12.4 GiB at P=8 K=4) at the same speed and computes the same program order-independent
values (identical losses and gradients in BENCHMARKS.md, `xla_cpu_options_float32`).

Opt-in, EEES_JAX_XLA_CPU_CONVOLUTIONS=eigen: convolutions on XLA's Eigen path instead of YNNPACK,
where the pinned jaxlib (0.10.2) sends them. On the AVX-512 CPU the project was measured on,
YNNPACK's 3x3 convolutions ran at about half Eigen's speed (forward and backward) and the RN50 step
was about 10% faster on Eigen (also 1.6 GiB less temporaries at P=8 K=4 with the schedule above).
It is the same function, but Eigen's summation order follows its thread partitioning: a two-process
run then drifts from a one-process run on two devices by more than the rounding that
tests/test_multiprocess.py allows (4 of 2304 kernel values 2.7e-3 apart after 6 Adam steps), so it
is not the default. `python -m bench.xla_cpu_options` measures both.

They are passed per compilation (`jax.jit(..., compiler_options=compiler_options())`), not through
XLA_FLAGS: TensorFlow's own XLA reads XLA_FLAGS too and stops on option names it does not know. So
they need a top-level jit: the trainer's step has one; the test-time feature, which export nests in
its own jit, keeps jaxlib's defaults (evaluation and inference stay one program). They apply only to
the CPU backend and only with the jaxlib they were measured on (option names change between
releases); EEES_JAX_XLA_CPU_DEFAULTS=0 turns them all off.
"""
from __future__ import annotations

import os

import jax
import jaxlib

MEASURED_JAXLIB = "0.10.2"
DEFAULTS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
# EEES_JAX_XLA_CPU_CONVOLUTIONS=eigen: YNNPACK keeps the matmuls only (the jaxlib's default list is
# individual matmuls and individual convolutions).
EIGEN_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
ENV_SWITCH = "EEES_JAX_XLA_CPU_DEFAULTS"
ENV_CONVOLUTIONS = "EEES_JAX_XLA_CPU_CONVOLUTIONS"


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
  """The options for jax.jit's compiler_options on `backend` (default: JAX's default backend), or
  None (jaxlib's own defaults) off the CPU, with another jaxlib, or with EEES_JAX_XLA_CPU_DEFAULTS=0."""
  if os.environ.get(ENV_SWITCH, "1") == "0":
    return None
  if (backend or jax.default_backend()) != "cpu" or jaxlib.__version__ != MEASURED_JAXLIB:
    return None
  convolutions = os.environ.get(ENV_CONVOLUTIONS, "ynnpack")
  if convolutions not in ("ynnpack", "eigen"):
    raise ValueError(f"{ENV_CONVOLUTIONS}={convolutions!r}: use ynnpack (the default) or eigen")
  return {**DEFAULTS, **(EIGEN_CONVOLUTIONS if convolutions == "eigen" else {})}
