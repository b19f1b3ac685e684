"""Writes one benchmark's figures into its own section of BENCHMARKS.md.

Each script owns the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; a rerun replaces
that section and leaves the others alone, so scripts can be run in any order.
"""
from __future__ import annotations

import os
import platform
import re

import numpy as np

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "BENCHMARKS.md")
_HEADER = "# Benchmarks\n\nFigures written by the scripts in bench/; each section names its command.\n"


def machine_description() -> str:
  """A one-line description of the machine a figure was measured on."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    import jax
    devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  except Exception:  # Benchmarks without JAX still describe the host.
    devices = "no JAX"
  return f"{os.cpu_count()} cores, {cpu}; JAX devices: {devices}; numpy {np.__version__}"


def write_section(name: str, markdown: str, path: str = BENCHMARKS_MD) -> None:
  """Replaces (or appends) the section `name` of BENCHMARKS.md with `markdown`."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  block = f"{begin}\n{markdown.strip()}\n{end}\n"
  text = open(path).read() if os.path.exists(path) else _HEADER
  pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
  text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
  with open(path, "w") as f:
    f.write(text)
