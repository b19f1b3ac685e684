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


def _cpu(cpuinfo: str) -> str:
  """'AMD EPYC (family 25 model 1, AVX2)' from the text of /proc/cpuinfo (its first processor).

  Hosts that report the same model name can differ in vector units (this project has measured on
  an EPYC with AVX-512 and on one with AVX2 only, both called 'AMD EPYC'), and XLA compiles for
  the units it finds, so speed and results are only comparable within one of these strings.
  """
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      break  # the first processor's block is enough: the cores of one host are alike
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  name = fields.get("model name") or platform.processor() or platform.machine()
  flags = set(fields.get("flags", "").split())
  units = [u for u, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AMX", "amx_tile"),
                             ("AVX512_BF16", "avx512_bf16")) if flag in flags]
  if "AVX-512" in units:
    units.remove("AVX2")  # implied
  detail = [f"family {fields['cpu family']} model {fields['model']}"] if (
      "cpu family" in fields and "model" in fields) else []
  detail += units
  return f"{name} ({', '.join(detail)})" if detail else name


def machine_description() -> str:
  """A one-line description of the machine a figure was measured on."""
  try:
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  except OSError:  # not Linux: _cpu falls back to the platform's own name
    cpuinfo = ""
  cpu = _cpu(cpuinfo)
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
