"""Writing a folder all at once: build it in a staging folder beside its place, then rename.

A reader sees the previous folder or the new one, never a half-written one; a crash or kill leaves
at most a hidden staging (or retired) folder beside it, which the next write there removes. Used
for the search index and the export folder.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

_STAGING, _RETIRED = ".staging-", ".retired-"


@contextlib.contextmanager
def staged_folder(out: str) -> Iterator[str]:
  """Yields an empty staging folder beside `out`; when the block ends without an exception, the
  staging folder becomes `out` (replacing what was there), else it is removed."""
  out = os.path.abspath(out)
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  for entry in os.listdir(parent):  # what a killed write left beside `out`
    if entry.startswith((f"{_STAGING}{name}-", f"{_RETIRED}{name}-")):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
  staging = tempfile.mkdtemp(prefix=f"{_STAGING}{name}-", dir=parent)
  try:
    umask = os.umask(0)  # mkdtemp makes the folder 0700; give it the usual permissions
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    yield staging
    if os.path.exists(out):
      retired = tempfile.mkdtemp(prefix=f"{_RETIRED}{name}-", dir=parent)
      os.replace(out, os.path.join(retired, "previous"))
      os.replace(staging, out)
      shutil.rmtree(retired, ignore_errors=True)
    else:
      os.replace(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
