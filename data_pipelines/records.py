"""The one record type every data set reader returns and every consumer reads.

Readers (sysu_mm01, regdb, llcm, synthetic) turn a data set folder into lists of `ImageRecord`;
the input pipeline, the description reader and the evaluation protocols only ever see these.
"""
from __future__ import annotations

import dataclasses
from typing import Any

VISIBLE = 0
INFRARED = 1
MODALITY_NAMES = {VISIBLE: "visible", INFRARED: "infrared"}


class DatasetError(ValueError):
  """Bad or missing data set input; the message names the file and what was expected."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image of a data set.

  path: relative to the data set root, with forward slashes (the key of its description).
  pid: identity; relabelled 0..N-1 in training sets, the data set's own id in test sets.
  camid: camera number as the data set names it (SYSU-MM01: 1..6).
  modality: VISIBLE or INFRARED.
  """
  path: str
  pid: int
  camid: int
  modality: int


@dataclasses.dataclass(frozen=True)
class TrainSet:
  """Training records of one data set (or one RegDB split) with its root folder.

  images: where the encoded images come from (data_pipelines.image_source); None: the files
  under `root`.
  """
  root: str
  records: tuple[ImageRecord, ...]
  num_classes: int
  images: Any = dataclasses.field(default=None, compare=False)

  @property
  def source(self):
    """The ImageSource of the records' images."""
    from data_pipelines import image_source  # pylint: disable=g-import-not-at-top (no cycle)
    return self.images if self.images is not None else image_source.FolderImages(self.root)

  def of_modality(self, modality: int) -> list[int]:
    """Indices into `records` of one modality."""
    return [i for i, r in enumerate(self.records) if r.modality == modality]
