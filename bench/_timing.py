"""Wall-clock timing of repeated calls, shared by the bench scripts."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def call_seconds(fn: Callable[[], Any], calls: int) -> tuple[list[float], Any]:
  """Seconds of each of `calls` calls of fn, each waited for (jax.block_until_ready: JAX dispatches
  asynchronously), and the last call's result. Warm-up and compile are the caller's."""
  times, out = [], None
  for _ in range(calls):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times, out


def median_ms(fn: Callable[[], Any], calls: int) -> float:
  """Median milliseconds of `calls` calls of fn (see call_seconds)."""
  return 1e3 * statistics.median(call_seconds(fn, calls)[0])
