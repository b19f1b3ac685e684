"""XLA:CPU compile options for the train step and the test-time feature: the fastest measured on a CPU.

Both change the program, not the function (BENCHMARKS.md, `xla_cpu_options_float32`):
- the memory-optimised HLO schedule: lower buffers for the RN50 step (XLA's temporaries 13.4 ->
  12.4 GiB at P=8 K=4), identical losses and gradients;
- convolutions on XLA's Eigen path instead of YNNPACK, where the pinned jaxlib (0.10.2) sends them.
  On the AVX-512 CPU the project was measured on, YNNPACK's 3x3 convolutions ran at about half
  Eigen's speed (forward and backward), and the RN50 step is faster on Eigen. Features agree to
  1e-7 and gradients to float rounding. Eigen's summation order follows its thread partitioning, so
  runs with different thread counts per device (two processes against one process with two
  devices) drift apart by rounding that Adam amplifies; tests/test_multiprocess.py, which compares
  exactly those, pins YNNPACK. EEES_JAX_XLA_CPU_CONVOLUTIONS=ynnpack keeps jaxlib's choice.

They are passed per compilation (`jax.jit(..., compiler_options=compiler_options())`), not through
XLA_FLAGS: TensorFlow's own XLA reads XLA_FLAGS too and stops on option names it does not know. So
they need a top-level jit: the trainer's step and the test-time feature of evaluation and inference
take them; export, which nests the feature in its own jit, keeps jaxlib's defaults. They apply only to
the CPU backend and only with the jaxlib they were measured on (option names change between
releases); EEES_JAX_XLA_CPU_DEFAULTS=0 turns them all off.
"""
from __future__ import annotations

import os

import jax
import jaxlib

MEASURED_JAXLIB = "0.10.2"
SCHEDULE = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
# YNNPACK keeps the matmuls only (the jaxlib's default list is individual matmuls and individual
# convolutions).
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
  convolutions = os.environ.get(ENV_CONVOLUTIONS, "eigen")
  if convolutions not in ("ynnpack", "eigen"):
    raise ValueError(f"{ENV_CONVOLUTIONS}={convolutions!r}: use eigen (the default) or ynnpack")
  return {**SCHEDULE, **(EIGEN_CONVOLUTIONS if convolutions == "eigen" else {})}
