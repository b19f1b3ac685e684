"""LLCM: training records and the test lists of the DEEN code base, both search directions.

Layout of an unpacked LLCM folder:
  idx/train_vis.txt, idx/train_nir.txt   "<relative path> <label>" lines (training images)
  idx/test_id.txt                        one line of comma-separated test ids
  test_vis/cam<c>/<pid:04d>/*.jpg        visible test images, cameras 1..9
  test_nir/cam<c>/<pid:04d>/*.jpg        near-infrared test images, cameras 1, 2, 4..9

DEEN (data_manager.py: process_query_llcm, process_gallery_llcm; test.py) builds, for a query
modality, the query list from every image of that modality and the gallery, per trial, from the
other modality:
  query:   for id in sorted(test ids): for camera of the query modality: every file, sorted.
  gallery: Python's random seeded with the trial; for id in sorted(test ids): for camera of the
           gallery modality: if the folder exists, random.choice(sorted files).
Direction "infrared_to_visible" (DEEN's default, test_mode [1, 2]) has the near-infrared images as
queries and draws the gallery from the visible ones; "visible_to_infrared" the reverse (the lists
DEEN builds with test_mode [2, 1]). pid is the original id, camid the camera number, which the
evaluation uses to drop same-camera matches (cameras are shared by both modalities in LLCM).
"""
from __future__ import annotations

import collections
import os
import random
import re
from collections.abc import Iterable, Sequence

from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord, TrainSet
from data_pipelines.regdb import read_label_list
from data_pipelines.sysu_mm01 import read_id_file

VISIBLE_CAMERAS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
INFRARED_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)
DIRECTIONS = ("infrared_to_visible", "visible_to_infrared")
_FOLDERS = {VISIBLE: ("test_vis", VISIBLE_CAMERAS), INFRARED: ("test_nir", INFRARED_CAMERAS)}
_TEST_ID_HINT = "LLCM lists its test identities in idx/test_id.txt (one line of comma-separated ids)"


def _check_root(root: str) -> str:
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DatasetError(f"LLCM root {root} does not exist or is not a folder; pass the folder that "
                       "holds idx/, test_vis/ and test_nir/")
  return root


def _camera_of(path: str, list_path: str) -> int:
  """Camera number from an LLCM file name (<pid>_c<cam>_s..._f..._vis.jpg) or a cam<c> folder."""
  match = re.search(r"_c(\d+)", os.path.basename(path)) or re.search(r"(?:^|/)cam(\d+)/", path)
  if not match:
    raise DatasetError(f"{list_path}: cannot tell the camera of {path}; expected a file name "
                       "'<pid>_c<camera>_...' or a 'cam<camera>/' folder")
  return int(match.group(1))


def train_set(root: str) -> TrainSet:
  """Training records of idx/train_vis.txt then idx/train_nir.txt, in list order.

  Labels are relabelled 0..N-1 in sorted order of the listed labels; camid from the file name.
  """
  root = _check_root(root)
  parts = []
  for name, modality in (("train_vis.txt", VISIBLE), ("train_nir.txt", INFRARED)):
    list_path = os.path.join(root, "idx", name)
    parts.append([(p, y, _camera_of(p, list_path), modality) for p, y in read_label_list(list_path, root)])
  entries = parts[0] + parts[1]
  label = {y: i for i, y in enumerate(sorted({e[1] for e in entries}))}
  records = tuple(ImageRecord(p, label[y], camid, modality) for p, y, camid, modality in entries)
  return TrainSet(root=root, records=records, num_classes=len(label))


def _modalities(direction: str) -> tuple[int, int]:
  """(query modality, gallery modality) of a search direction."""
  if direction == "infrared_to_visible":
    return INFRARED, VISIBLE
  if direction == "visible_to_infrared":
    return VISIBLE, INFRARED
  raise ValueError(f"LLCM direction must be one of {DIRECTIONS}, got {direction!r}")


def test_records(root: str) -> list[ImageRecord]:
  """Every test image: visible then infrared, each by sorted id, camera, sorted file name."""
  root = _check_root(root)
  ids = sorted(read_id_file(os.path.join(root, "idx", "test_id.txt"), _TEST_ID_HINT))
  records = []
  for modality in (VISIBLE, INFRARED):
    folder, cameras = _FOLDERS[modality]
    if not os.path.isdir(os.path.join(root, folder)):
      raise DatasetError(f"LLCM root {root} lacks {folder}/; the archive is incompletely extracted")
    records += _scan(root, folder, cameras, ids, modality)
  present = {r.pid for r in records}
  empty = [pid for pid in ids if pid not in present]
  if empty:
    raise DatasetError(f"{root}: {len(empty)} id(s) of idx/test_id.txt have no test images: {empty[:10]}")
  return records


def _scan(root: str, folder: str, cameras: Sequence[int], ids: Sequence[int],
          modality: int) -> list[ImageRecord]:
  records = []
  for pid in ids:
    for camid in cameras:
      directory = os.path.join(root, folder, f"cam{camid}", f"{pid:04d}")
      if os.path.isdir(directory):
        records += [ImageRecord(f"{folder}/cam{camid}/{pid:04d}/{name}", pid, camid, modality)
                    for name in sorted(os.listdir(directory))]
  return records


def query_set(root: str, direction: str = "infrared_to_visible") -> list[ImageRecord]:
  """Every test image of the query modality of `direction` (see the module docstring)."""
  return select_query(test_records(root), direction)


def select_query(records: Iterable[ImageRecord],
                 direction: str = "infrared_to_visible") -> list[ImageRecord]:
  """The query list of already-listed test records: those of the query modality, in order."""
  query_modality, _ = _modalities(direction)
  return [r for r in records if r.modality == query_modality]


def select_gallery(records: Iterable[ImageRecord], direction: str = "infrared_to_visible",
                   trial: int = 0) -> list[ImageRecord]:
  """DEEN's gallery draw of one trial applied to already-listed test records.

  random seeded with `trial`; for id in sorted(ids): for camera of the gallery modality (in the
  order of VISIBLE_CAMERAS / INFRARED_CAMERAS) with images: random.choice(files sorted by name).
  Records of the query modality are ignored, so the full `test_records` list can be passed.
  """
  _, gallery_modality = _modalities(direction)
  cameras = _FOLDERS[gallery_modality][1]
  groups: dict[tuple[int, int], list[ImageRecord]] = collections.defaultdict(list)
  for r in records:
    if r.modality == gallery_modality:
      groups[(r.pid, r.camid)].append(r)
  rng = random.Random(trial)  # The stream of DEEN's random.seed(trial), without global state.
  gallery = []
  for pid in sorted({pid for pid, _ in groups}):
    for camid in cameras:
      files = sorted(groups.get((pid, camid), ()), key=lambda r: r.path)
      if files:
        gallery.append(rng.choice(files))
  return gallery


def gallery_set(root: str, direction: str = "infrared_to_visible", trial: int = 0) -> list[ImageRecord]:
  """The gallery of one trial (0..9 in the protocol) for `direction`."""
  _modalities(direction)
  return select_gallery(test_records(root), direction, trial)
