"""RegDB: one training set and one test pair per split (1..10), from the data set's idx/ lists.

idx/{train,test}_{visible,thermal}_{split}.txt hold lines "<path relative to the root> <label>".
The protocol trains one model per split and reports visible->thermal and thermal->visible on the
split's test lists, averaged over the 10 splits.
"""
from __future__ import annotations

import os
import re

from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord, TrainSet

SPLITS = tuple(range(1, 11))
VISIBLE_CAMID = 1
THERMAL_CAMID = 2


def read_label_list(path: str, root: str) -> list[tuple[str, int]]:
  """Parses a "<relative path> <integer label>" list (RegDB, LLCM) into (path, label) pairs.

  Blank lines are skipped; the label is the last whitespace-separated token, so paths may hold
  spaces. Every listed image must exist under `root`.
  """
  if not os.path.isfile(path):
    raise DatasetError(f"list file {path} is missing")
  entries = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      parts = line.rsplit(maxsplit=1)
      if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
        raise DatasetError(f"{path}:{number}: expected '<relative image path> <integer label>', "
                           f"got {line!r}")
      relative = parts[0].replace("\\", "/").removeprefix("./")
      if not os.path.isfile(os.path.join(root, relative)):
        raise DatasetError(f"{path}:{number}: image {relative} not found under {root}")
      entries.append((relative, int(parts[1])))
  if not entries:
    raise DatasetError(f"list file {path} holds no images")
  return entries


def _check(root: str, split: int) -> str:
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DatasetError(f"RegDB root {root} does not exist or is not a folder; pass the folder that "
                       "holds idx/ and the Visible/ and Thermal/ image folders")
  if split not in SPLITS:
    raise ValueError(f"RegDB split must be one of 1..10, got {split!r}")
  return root


def _list_path(root: str, part: str, modality: str, split: int) -> str:
  return os.path.join(root, "idx", f"{part}_{modality}_{split}.txt")


def train_set(root: str, split: int) -> TrainSet:
  """Training records of one split: visible (camid 1) then thermal (camid 2), in list order.

  Labels are relabelled 0..N-1 in sorted order of the labels the lists give.
  """
  root = _check(root, split)
  visible = read_label_list(_list_path(root, "train", "visible", split), root)
  thermal = read_label_list(_list_path(root, "train", "thermal", split), root)
  label = {y: i for i, y in enumerate(sorted({y for _, y in visible + thermal}))}
  records = tuple([ImageRecord(p, label[y], VISIBLE_CAMID, VISIBLE) for p, y in visible] +
                  [ImageRecord(p, label[y], THERMAL_CAMID, INFRARED) for p, y in thermal])
  return TrainSet(root=root, records=records, num_classes=len(label))


def test_sets(root: str, split: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """(visible records, thermal records) of one split's test lists; pid = the listed label.

  Visible->thermal search uses the visible list as queries and the thermal list as gallery;
  thermal->visible the reverse.
  """
  root = _check(root, split)
  visible = read_label_list(_list_path(root, "test", "visible", split), root)
  thermal = read_label_list(_list_path(root, "test", "thermal", split), root)
  return ([ImageRecord(p, y, VISIBLE_CAMID, VISIBLE) for p, y in visible],
          [ImageRecord(p, y, THERMAL_CAMID, INFRARED) for p, y in thermal])
