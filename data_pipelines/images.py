"""Reading and validating data set images with errors that name the bad file.

A damaged or truncated JPEG deep inside a multi-hour training run should fail with the file's name
and what to do, not with a decoder stack trace; readers and the TFDS builders go through here.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipelines.records import DatasetError, ImageRecord

_FIX = "re-extract the data set from its archive, or remove the image from the lists"


def _open_rgb(path: str) -> Image.Image:
  """Opens and fully decodes one image (truncation only shows on a full decode)."""
  if not os.path.isfile(path):
    raise DatasetError(f"image not found: {path}")
  try:
    with Image.open(path) as probe:  # Structural check first: catches headers that lie.
      probe.verify()
    image = Image.open(path)
    image.load()
    return image.convert("RGB")
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DatasetError(f"cannot read image {path}: {e}. The file is damaged or truncated; {_FIX}.") from e


def read_image(path: str) -> np.ndarray:
  """Decodes one image file to RGB.

  Returns: (H, W, 3) uint8. Grayscale and infrared images come back with three equal channels.
  Raises: DatasetError naming the file if it is missing, unreadable or truncated.
  """
  return np.asarray(_open_rgb(os.fspath(path)))


def check_image(path: str) -> None:
  """Raises DatasetError if `path` is not a complete, decodable image."""
  _open_rgb(os.fspath(path))


def check_images(root: str, records: Iterable[ImageRecord], max_listed: int = 10) -> None:
  """Decodes every image of `records` (paths relative to `root`) once.

  Raises one DatasetError that counts all bad images and names the first `max_listed`, so a
  damaged extraction is reported in one pass instead of one file per rerun.
  """
  bad = []
  count = 0
  for record in records:
    count += 1
    try:
      check_image(os.path.join(root, record.path))
    except DatasetError as e:
      bad.append(str(e))
  if bad:
    listed = "\n  ".join(bad[:max_listed])
    more = f"\n  ... and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
    raise DatasetError(f"{len(bad)} of {count} images under {root} cannot be read:\n  {listed}{more}")
