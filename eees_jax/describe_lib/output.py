"""The descriptions JSONL while it is being written: crash-safe appends, repair, final compaction.

During a run the file is a log: every finished batch is appended as whole lines and flushed to
disk (fsync), so a crash loses at most the batch in flight, never an earlier one. A later line for
the same image replaces an earlier one (the rewrite stage appends completed records). A crash in
the middle of a write can leave a partial last line; it is cut off on the next start. At the end
the log is rewritten once, one record per image sorted by image path, atomically (temporary file and
os.replace, data_pipelines.descriptions.write_records), so the final file is complete and its
order does not depend on batching or restarts. data_pipelines.descriptions.read_records reads the
log form too (a later line for an image wins).
"""
from __future__ import annotations

import fcntl
import json
import os
from typing import Any, Iterable

from absl import logging

from eees_jax.describe_lib.errors import DescribeError

RECORD_KEYS = ("image", "modality", "description", "rewritten", "model", "prompt", "rewrite_model",
               "rewrite_prompt", "generation", "flags")
MODALITIES = ("visible", "infrared")


def _check_record(rec: Any, where: str) -> None:
  if not isinstance(rec, dict):
    raise DescribeError(f"{where}: not a JSON object")
  missing = [k for k in RECORD_KEYS if k not in rec]
  if missing:
    raise DescribeError(f"{where}: record lacks {', '.join(missing)} (SPEC section 4 format)")
  if not isinstance(rec["image"], str) or rec["modality"] not in MODALITIES:
    raise DescribeError(f"{where}: 'image' must be a path string and 'modality' one of {MODALITIES}")


def encode(rec: dict) -> bytes:
  """One record as one UTF-8 line (no newline inside: JSON escapes it)."""
  return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


def _fsync_dir(path: str) -> None:
  fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class DescriptionLog:
  """An exclusively locked, append-only descriptions file; `records` holds its content by image."""

  def __init__(self, path: str):
    self.path = path
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
      raise DescribeError(f"--out={path}: folder {parent} does not exist")
    self._created = not os.path.exists(path)
    self._f = open(path, "a+b")
    try:
      fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      self._f.close()
      raise DescribeError(f"--out={path}: another describe run is writing this file") from e
    try:
      self.records: dict[str, dict] = self._load()
    except BaseException:
      self.close()
      raise

  def _load(self) -> dict[str, dict]:
    """Reads the log, first cutting off a partial last line left by an interrupted write."""
    self._f.seek(0)
    data = self._f.read()
    if data and not data.endswith(b"\n"):
      keep = data.rfind(b"\n") + 1
      dropped = data[keep:]
      self._f.truncate(keep)
      self._f.flush()
      os.fsync(self._f.fileno())
      preview = dropped[:80].decode("utf-8", errors="replace")
      logging.warning("%s: dropped a partial last line (%d bytes, starting %r) left by an "
                      "interrupted run; that image will be described again",
                      self.path, len(dropped), preview)
      data = data[:keep]
    records: dict[str, dict] = {}
    for n, line in enumerate(data.split(b"\n")[:-1] if data else [], start=1):
      if not line.strip():
        continue
      where = f"{self.path}, line {n}"
      try:
        rec = json.loads(line.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DescribeError(f"{where}: not a JSON record ({e}); the file is damaged or was not "
                            f"written by eees_jax.describe: move it away or pass another --out") from e
      _check_record(rec, where)
      records[rec["image"]] = rec
    return records

  def append(self, records: Iterable[dict]) -> None:
    """Appends whole lines and forces them to disk before returning."""
    recs = list(records)
    if not recs:
      return
    self._f.seek(0, os.SEEK_END)
    self._f.write(b"".join(encode(r) for r in recs))
    self._f.flush()
    os.fsync(self._f.fileno())
    for r in recs:
      self.records[r["image"]] = r

  def compact(self) -> None:
    """Rewrites the file atomically: one record per image, sorted by image path."""
    from data_pipelines.descriptions import write_records
    write_records(self.path, (self.records[image] for image in sorted(self.records)))
    _fsync_dir(self.path)

  def close(self) -> None:
    """Releases the lock; a file this run created and never wrote to is removed again."""
    if self._f.closed:
      return
    empty = os.fstat(self._f.fileno()).st_size == 0
    fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
    self._f.close()
    if self._created and empty and os.path.exists(self.path) and os.path.getsize(self.path) == 0:
      os.remove(self.path)
