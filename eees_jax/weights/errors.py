"""The error every weight reader and converter raises, and how its messages list offenders."""
from __future__ import annotations

MAX_LISTED = 20


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the architecture; names keys and paths."""


def listing(items: list[str], what: str) -> str:
  """'what (n): a, b, ...' with at most MAX_LISTED items shown."""
  shown = ", ".join(items[:MAX_LISTED])
  more = f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
  return f"{what} ({len(items)}): {shown}{more}"
