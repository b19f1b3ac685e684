"""SYSU-MM01: training records and the standard test lists (query, per-trial gallery).

Layout of an unpacked SYSU-MM01 folder (the synthetic benchmark writes the same):
  cam1 .. cam6/<pid:04d>/<n:04d>.jpg   visible cameras 1, 2, 4, 5; infrared cameras 3, 6
  exp/train_id.txt, exp/val_id.txt, exp/test_id.txt   one line each of comma-separated ids
  exp/rand_perm_cam.mat   (optional) the official gallery permutations of the data set's authors

Published numbers are computed on the lists of the AGW code base (process_query_sysu and
process_gallery_sysu in its data_manager.py), so `query_set` and `gallery_set` reproduce them
exactly; the rule is spelled out in their docstrings.
"""
from __future__ import annotations

import collections
import os
import random
from collections.abc import Iterable, Sequence

import numpy as np

from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord, TrainSet

CAMERAS = (1, 2, 3, 4, 5, 6)
VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
# Gallery cameras per search mode; queries always come from both infrared cameras.
GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
QUERY_CAMERAS = (3, 6)
MULTI_SHOT = 10
ID_FILES = ("train_id.txt", "val_id.txt", "test_id.txt")
GALLERY_SOURCES = ("random", "official")
_MAX_ID = 9999  # Folder names are the id with 4 digits.


def camera_modality(camid: int) -> int:
  """VISIBLE for cameras 1, 2, 4, 5 and INFRARED for 3, 6."""
  if camid in VISIBLE_CAMERAS:
    return VISIBLE
  if camid in INFRARED_CAMERAS:
    return INFRARED
  raise DatasetError(f"SYSU-MM01 has cameras 1..6, got camera {camid}")


def _check_root(root: str) -> str:
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DatasetError(f"SYSU-MM01 root {root} does not exist or is not a folder; pass the folder that "
                       "holds cam1..cam6 and exp/ (or generate the synthetic set with "
                       "`python -m data_pipelines.synthetic --out DIR`)")
  missing = [f"cam{c}" for c in CAMERAS if not os.path.isdir(os.path.join(root, f"cam{c}"))]
  if missing:
    raise DatasetError(f"SYSU-MM01 root {root} lacks camera folder(s) {', '.join(missing)}; "
                       "the archive is incompletely extracted")
  return root


_ID_FILES_HINT = ("SYSU-MM01 lists its splits in exp/train_id.txt, exp/val_id.txt and exp/test_id.txt "
                  "(one line of comma-separated ids each)")


def read_id_file(path: str, hint: str = _ID_FILES_HINT) -> list[int]:
  """Parses an id file: one line of comma-separated positive integer ids.

  SYSU-MM01's exp/*_id.txt and LLCM's idx/test_id.txt use this format.
  """
  if not os.path.isfile(path):
    raise DatasetError(f"{path} is missing; {hint}")
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f.read().splitlines()]
  lines = [line for line in lines if line]
  if len(lines) != 1:
    raise DatasetError(f"{path}: expected one line of comma-separated ids, found {len(lines)} non-empty "
                       "lines")
  ids = []
  for position, token in enumerate(lines[0].split(","), start=1):
    token = token.strip()
    if not token.isdigit() or not 1 <= int(token) <= _MAX_ID:
      raise DatasetError(f"{path}: token {position} is {token!r}, expected an integer id in 1..{_MAX_ID}")
    ids.append(int(token))
  duplicated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
  if duplicated:
    raise DatasetError(f"{path}: id(s) {duplicated[:10]} listed more than once")
  return ids


def split_ids(root: str) -> dict[str, list[int]]:
  """The ids of exp/train_id.txt, val_id.txt and test_id.txt, keyed "train", "val", "test"."""
  root = _check_root(root)
  splits = {name.split("_")[0]: read_id_file(os.path.join(root, "exp", name)) for name in ID_FILES}
  for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
    shared = sorted(set(splits[a]) & set(splits[b]))
    if shared:
      raise DatasetError(f"{root}/exp: id(s) {shared[:10]} are in both {a}_id.txt and {b}_id.txt")
  return splits


def _list_folder(root: str, camid: int, pid: int) -> list[str]:
  """Sorted entries of cam<camid>/<pid:04d>, or [] when the folder is absent.

  Like the AGW code this lists every entry of the folder; an empty folder counts as absent (the
  AGW code would fail drawing from it).
  """
  folder = os.path.join(root, f"cam{camid}", f"{pid:04d}")
  if not os.path.isdir(folder):
    return []
  return sorted(os.listdir(folder))


def _scan(root: str, ids: Iterable[int], cameras: Sequence[int], id_file: str) -> list[ImageRecord]:
  """Records of `ids` in `cameras`, ordered by id, camera, file; pid = original id."""
  records, empty = [], []
  for pid in sorted(ids):
    found = []
    for camid in cameras:
      found += [ImageRecord(f"cam{camid}/{pid:04d}/{name}", pid, camid, camera_modality(camid))
                for name in _list_folder(root, camid, pid)]
    if not found:
      empty.append(pid)
    records += found
  if empty:
    raise DatasetError(f"{root}: {len(empty)} id(s) listed in exp/{id_file} have no images in cameras "
                       f"{list(cameras)}: {empty[:10]}")
  return records


def training_records(root: str, num_ids: int | None = None) -> list[ImageRecord]:
  """Every image of the first `num_ids` (default: all) ids of exp/train_id.txt, sorted, with the
  original ids as pid (no relabelling): e.g. a same-sized counterpart of the test ids, to tell a
  model that did not fit from one that did not generalise (eees_jax.diagnostics). Reads only
  train_id.txt, so it also serves sets without val or test ids (synthetic pretraining sets)."""
  root = _check_root(root)
  ids = sorted(read_id_file(os.path.join(root, "exp", "train_id.txt")))
  return _scan(root, ids if num_ids is None else ids[:num_ids], CAMERAS, "train_id.txt")


EVAL_SPLITS = ("test", "val")


def train_set(root: str, holdout: bool = False) -> TrainSet:
  """Training records: the train and val ids, all six cameras, labels relabelled 0..N-1.

  holdout=True keeps the val ids out (train ids only), so that a run evaluated on them
  (`split="val"` below) can tune settings without ever looking at the test ids.
  Labels follow the sorted original ids; records are ordered by id, camera, file name. Identities
  missing from some cameras are normal and skipped; an id with no image at all is an error.
  """
  root = _check_root(root)
  splits = split_ids(root)
  ids = sorted(splits["train"] + ([] if holdout else splits["val"]))
  scanned = _scan(root, ids, CAMERAS, "train_id.txt" if holdout else "train_id.txt / val_id.txt")
  label = {pid: i for i, pid in enumerate(ids)}
  records = tuple(ImageRecord(r.path, label[r.pid], r.camid, r.modality) for r in scanned)
  return TrainSet(root=root, records=records, num_classes=len(ids))


def _check_split(split: str) -> str:
  if split not in EVAL_SPLITS:
    raise ValueError(f"SYSU-MM01 evaluation split must be one of {EVAL_SPLITS}, got {split!r}")
  return split


def test_records(root: str, split: str = "test") -> list[ImageRecord]:
  """Every image of the test ids in all six cameras (pid = original id), by id, camera, file.

  The query list and every gallery draw are subsets of these (see `select_gallery`).
  split="val": the same for the val ids (a held-out validation run; never reported as a result).
  """
  root = _check_root(root)
  return _scan(root, split_ids(root)[_check_split(split)], CAMERAS, f"{split}_id.txt")


def _check_mode(mode: str) -> tuple[int, ...]:
  if mode not in GALLERY_CAMERAS:
    raise ValueError(f"SYSU-MM01 search mode must be one of {sorted(GALLERY_CAMERAS)}, got {mode!r}")
  return GALLERY_CAMERAS[mode]


def query_set(root: str, mode: str = "all", split: str = "test") -> list[ImageRecord]:
  """The AGW query list: all infrared images of the test ids.

  for id in sorted(test ids): for camera in (3, 6): every file of cam<c>/<id>, sorted. The list is
  the same for both modes (indoor search only shrinks the gallery). pid = original id.
  """
  _check_mode(mode)
  return select_query(test_records(root, split))


def select_query(records: Iterable[ImageRecord]) -> list[ImageRecord]:
  """The query list of already-listed test records (`test_records` or the TFDS test splits): the
  infrared-camera images, in the given order."""
  return [r for r in records if r.camid in QUERY_CAMERAS]


def select_gallery(records: Iterable[ImageRecord], mode: str = "all", trial: int = 0,
                   shots: int = 1) -> list[ImageRecord]:
  """The AGW gallery draw of one trial, applied to already-listed test records.

  Python's `random` seeded with `trial`; for id in sorted(ids): for camera in (1, 2, 4, 5)
  (all-search) or (1, 2) (indoor-search), when the id has images there, with the file names
  sorted: single-shot (shots=1) takes `random.choice(files)`; multi-shot (shots > 1, 10 in the
  protocol) takes `random.sample(files, shots)` in draw order, or all files in sorted order
  without a draw when the folder holds fewer than `shots` (the AGW code would fail there).
  Records of other cameras are ignored, so the full `test_records` list (or the TFDS test split)
  can be passed.
  """
  cameras = _check_mode(mode)
  if shots < 1:
    raise ValueError(f"shots must be >= 1, got {shots}")
  groups: dict[tuple[int, int], list[ImageRecord]] = collections.defaultdict(list)
  for r in records:
    if r.camid in cameras:
      groups[(r.pid, r.camid)].append(r)
  rng = random.Random(trial)  # Same stream as the AGW code's random.seed(trial), without global state.
  gallery = []
  for pid in sorted({pid for pid, _ in groups}):
    for camid in cameras:
      files = sorted(groups.get((pid, camid), ()), key=lambda r: r.path)
      if not files:
        continue
      if shots == 1:
        gallery.append(rng.choice(files))
      elif len(files) >= shots:
        gallery += rng.sample(files, shots)
      else:
        gallery += files
  return gallery


def gallery_set(root: str, mode: str = "all", trial: int = 0, shots: int = 1,
                source: str = "random", split: str = "test") -> list[ImageRecord]:
  """The gallery of one trial (0..9 in the protocol); pid = original id, camid = camera.

  source="random": the AGW draw (see `select_gallery`), the lists behind published numbers.
  source="official": the permutations of exp/rand_perm_cam.mat from the data set's own
  evaluation code: for id in sorted(test ids): for camera of the mode: the first `shots` image
  numbers of the id's permutation row `trial`, as cam<c>/<id:04d>/<n:04d>.jpg. Needs scipy.
  """
  cameras = _check_mode(mode)
  if source == "random":
    return select_gallery(test_records(root, split), mode, trial, shots)
  if source != "official":
    raise ValueError(f"gallery source must be one of {GALLERY_SOURCES}, got {source!r}")
  if _check_split(split) != "test":
    raise ValueError("the official rand_perm_cam.mat galleries cover the test ids only; use "
                     "source='random' for split='val'")
  root = _check_root(root)
  return _official_gallery(root, split_ids(root)["test"], cameras, trial, shots)


def _unwrap(cell):
  """Strips the 1-element object arrays scipy wraps MATLAB cells in."""
  while isinstance(cell, np.ndarray) and cell.dtype == object and cell.size == 1:
    cell = cell.reshape(-1)[0]
  return cell


def _official_gallery(root: str, ids: Sequence[int], cameras: Sequence[int], trial: int,
                      shots: int) -> list[ImageRecord]:
  path = os.path.join(root, "exp", "rand_perm_cam.mat")
  if not os.path.isfile(path):
    raise DatasetError(f"{path} is missing; copy rand_perm_cam.mat from the SYSU-MM01 evaluation code "
                       "(evaluation/data_split/) into exp/, or use the AGW gallery (source='random')")
  import scipy.io  # Only this option needs scipy (installed with jax).
  try:
    perm = scipy.io.loadmat(path)["rand_perm_cam"]
  except (KeyError, ValueError, OSError, TypeError) as e:
    raise DatasetError(f"{path}: not a MATLAB file with a 'rand_perm_cam' cell array ({e})") from e
  per_camera = np.asarray(perm, dtype=object).reshape(-1)
  if per_camera.size != len(CAMERAS):
    raise DatasetError(f"{path}: rand_perm_cam has {per_camera.size} camera cells, expected 6")
  gallery = []
  for pid in sorted(ids):
    for camid in cameras:
      per_id = np.asarray(_unwrap(per_camera[camid - 1]), dtype=object).reshape(-1)
      if pid > per_id.size:
        continue
      rows = np.asarray(_unwrap(per_id[pid - 1]))
      if rows.size == 0:
        continue  # The id has no images in this camera.
      rows = rows.reshape(rows.shape[0], -1)
      if not 0 <= trial < rows.shape[0]:
        raise DatasetError(f"{path}: trial {trial} requested, the file holds {rows.shape[0]} trials")
      present = set(_list_folder(root, camid, pid))
      for number in rows[trial][:shots]:
        name = f"{int(number):04d}.jpg"
        if name not in present:
          raise DatasetError(f"{path} names cam{camid}/{pid:04d}/{name}, which is not on disk")
        gallery.append(ImageRecord(f"cam{camid}/{pid:04d}/{name}", pid, camid, VISIBLE))
  return gallery
