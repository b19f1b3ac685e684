"""The descriptions file: one JSON object per image, keyed by the image path relative to the root.

Format (SPEC section 4), one line per image:
  {"image": "cam1/0001/0001.jpg", "modality": "visible" | "infrared", "description": "...",
   "rewritten": null | "...", "model": ..., "prompt": ..., "rewrite_model": ..., "rewrite_prompt": ...,
   "generation": {...}, "flags": [...]}
Training reads it through `load_descriptions`, aligned with the training records; the description
generator (eees_jax.describe) and the synthetic benchmark write it through `write_records`.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence

from data_pipelines.records import DatasetError, ImageRecord

FIELDS = ("description", "rewritten", "auto")
_DESCRIBE_HINT = "python -m eees_jax.describe"


def read_records(path: str) -> dict[str, dict]:
  """All records of a descriptions file by image path; a later line for the same image wins.

  (A resumed generation run may append a newer record for an image.)
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DatasetError(f"descriptions file {path} not found; write it with `{_DESCRIBE_HINT} ...` "
                       "(or generate the synthetic set, which ships one)")
  records = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); the file "
                           "may have been cut by a crash: delete that line and rerun the generator, "
                           "which skips images already described") from e
      if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise DatasetError(f"{path}:{number}: expected a JSON object with a string \"image\" field")
      records[record["image"]] = record
  return records


def _text(record: dict | None, field: str) -> str | None:
  """The text `field` selects from one record, or None when absent or empty."""
  if record is None:
    return None
  if field == "auto":
    text = record.get("rewritten")
    if not (isinstance(text, str) and text.strip()):
      text = record.get("description")
  else:
    text = record.get(field)
  return text if isinstance(text, str) and text.strip() else None


def load_descriptions(path: str, records: Sequence[ImageRecord], field: str = "description") -> list[str]:
  """One description per record, in record order, joined on record.path == "image".

  field: "description" (the model's own text), "rewritten" (the one-sentence rewrite), or "auto"
  (the rewrite where there is one, else the description).
  Raises: DatasetError for a missing file, a malformed line, or records without a usable text
  (missing, null or empty), listing how many and the first 10.
  """
  if field not in FIELDS:
    raise ValueError(f"description field must be one of {FIELDS}, got {field!r}")
  by_image = read_records(path)
  texts, missing = [], []
  for record in records:
    text = _text(by_image.get(record.path), field)
    if text is None:
      missing.append(record.path)
    texts.append(text)
  if missing:
    stage = "the rewrite stage" if field == "rewritten" else "the description generator"
    listed = "\n  ".join(missing[:10])
    raise DatasetError(f"{len(missing)} of {len(records)} images have no {field!r} text in {path} "
                       f"(first {min(10, len(missing))}):\n  {listed}\nRun {stage} for them: "
                       f"`{_DESCRIBE_HINT} ...` skips images already described.")
  return texts


def write_records(path: str, records: Iterable[dict]) -> int:
  """Writes `records` as a descriptions file, atomically (temp file + os.replace); returns the count.

  A reader never sees a half-written file, and a crash leaves the previous file intact.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  count = 0
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
          raise ValueError(f"record {count} has no string 'image' field: {record!r:.200}")
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)  # mkstemp creates 0600; give the file the usual permissions.
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return count
