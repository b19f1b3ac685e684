"""The Makefile's glibc allocator settings: glibc parses every one of them, and the opt-out works.

glibc ignores a tunable it does not know without a word, so a misspelt name would silently undo
the setting; the dynamic loader's --list-tunables shows what it actually parsed.
"""
import functools
import glob
import os
import shutil
import subprocess

import pytest

from bench import malloc_tunables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make(*args: str) -> str:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  return subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=ROOT, env=env,
                        check=True, capture_output=True, text=True).stdout.strip()


@functools.lru_cache(maxsize=None)
def _loader() -> str | None:
  """The glibc dynamic loader, if it has --list-tunables (glibc 2.33 and later); looked up once."""
  for path in sorted(glob.glob("/lib64/ld-linux-*.so.*") + glob.glob("/lib/ld-linux-*.so.*")):
    out = subprocess.run([path, "--list-tunables"], capture_output=True, text=True)
    if out.returncode == 0 and "glibc.malloc" in out.stdout:
      return path
  return None


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
def test_print_tunables_gives_the_value_the_bench_reads_and_the_opt_out_empties_it():
  printed = _make("print-tunables")
  value = malloc_tunables.makefile_tunables()
  assert printed == f"GLIBC_TUNABLES={value}"
  assert value.count("=") == 4 and "glibc.malloc.hugetlb=1" in value.split(":")
  assert _make("GLIBC_TUNABLES=", "print-tunables") == "GLIBC_TUNABLES="


@needs_make
@pytest.mark.skipif(_loader() is None, reason="no glibc loader with --list-tunables here")
def test_glibc_parses_every_tunable_the_makefile_sets():
  value = malloc_tunables.makefile_tunables()
  out = subprocess.run([_loader(), "--list-tunables"], capture_output=True, text=True, check=True,
                       env={**os.environ, "GLIBC_TUNABLES": value}).stdout
  parsed = {}
  for line in out.splitlines():
    name, _, rest = line.partition(":")
    parsed[name.strip()] = int(rest.split()[0], 16) if rest.strip() else None
  for item in value.split(":"):
    name, _, number = item.partition("=")
    assert name in parsed, f"glibc does not know {name}"
    assert parsed[name] == int(number), (name, parsed[name], number)
