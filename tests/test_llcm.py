"""LLCM reader: training lists and DEEN's query/gallery lists in both directions."""
import os
import random

import numpy as np
import pytest

from data_pipelines import llcm
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord

TEST_IDS = [3, 8, 12, 15]


@pytest.fixture
def tree(tmp_path):
  """Test folders with ids missing from some cameras and 1..5 files each; train lists."""
  root = tmp_path / "LLCM"
  rng = np.random.default_rng(0)
  for folder, cams, tag in (("test_vis", range(1, 10), "vis"), ("test_nir", (1, 2, 4, 5, 6, 7, 8, 9), "nir")):
    for pid in TEST_IDS:
      for cam in cams:
        if rng.random() < 0.4:
          continue
        directory = root / folder / f"cam{cam}" / f"{pid:04d}"
        directory.mkdir(parents=True)
        for k in rng.choice(np.arange(100, 999), size=int(rng.integers(1, 6)), replace=False):
          (directory / f"{pid:04d}_c{cam:02d}_s{k}_f{k * 7}_{tag}.jpg").write_bytes(b"x")
  (root / "idx").mkdir()
  (root / "idx" / "test_id.txt").write_text(",".join(str(i) for i in TEST_IDS) + "\n")
  train = {"train_vis.txt": [("vis/0005/0005_c04_s1_f1_vis.jpg", 40), ("vis/0001/0001_c09_s2_f3_vis.jpg", 1)],
           "train_nir.txt": [("nir/0005/0005_c06_s1_f1_nir.jpg", 40), ("nir/0001/0001_c02_s2_f3_nir.jpg", 1),
                             ("nir/0001/0001_c07_s2_f9_nir.jpg", 1)]}
  for name, entries in train.items():
    for path, _ in entries:
      (root / path).parent.mkdir(parents=True, exist_ok=True)
      (root / path).write_bytes(b"x")
    (root / "idx" / name).write_text("".join(f"{p} {y}\n" for p, y in entries))
  return str(root)


# Transcription of DEEN's process_query_llcm / process_gallery_llcm (mode 1 = visible folders,
# mode 2 = near-infrared folders), on paths relative to the root.
def _deen_cameras(mode):
  if mode == 1:
    return [f"test_vis/cam{c}" for c in range(1, 10)]
  return [f"test_nir/cam{c}" for c in (1, 2, 4, 5, 6, 7, 8, 9)]


def _deen_ids(root):
  with open(os.path.join(root, "idx/test_id.txt")) as file:
    ids = file.read().splitlines()
    return ["%04d" % int(y) for y in ids[0].split(",")]


def _parse(files):
  return [(p, int(p.split("cam")[1][2:6]), int(p.split("cam")[1][0])) for p in files]


def _deen_query(root, mode):
  files = []
  for id in sorted(_deen_ids(root)):
    for cam in _deen_cameras(mode):
      img_dir = os.path.join(cam, id)
      if os.path.isdir(os.path.join(root, img_dir)):
        files.extend(sorted([img_dir + "/" + i for i in os.listdir(os.path.join(root, img_dir))]))
  return _parse(files)


def _deen_gallery(root, mode, trial):
  random.seed(trial)
  files = []
  for id in sorted(_deen_ids(root)):
    for cam in _deen_cameras(mode):
      img_dir = os.path.join(cam, id)
      if os.path.isdir(os.path.join(root, img_dir)):
        new_files = sorted([img_dir + "/" + i for i in os.listdir(os.path.join(root, img_dir))])
        files.append(random.choice(new_files))
  return _parse(files)


@pytest.mark.parametrize("direction, query_mode, gallery_mode, query_modality", [
    ("infrared_to_visible", 2, 1, INFRARED), ("visible_to_infrared", 1, 2, VISIBLE)])
def test_lists_match_deen(tree, direction, query_mode, gallery_mode, query_modality):
  query = llcm.query_set(tree, direction)
  assert [(r.path, r.pid, r.camid) for r in query] == _deen_query(tree, query_mode)
  assert all(r.modality == query_modality for r in query)
  for trial in range(5):
    gallery = llcm.gallery_set(tree, direction, trial)
    assert [(r.path, r.pid, r.camid) for r in gallery] == _deen_gallery(tree, gallery_mode, trial)
    assert all(r.modality != query_modality for r in gallery)
    records = llcm.test_records(tree)[::-1]  # Order of the input does not matter.
    assert llcm.select_gallery(records, direction, trial) == gallery


def test_train_set(tree):
  train = llcm.train_set(tree)
  assert list(train.records) == [
      ImageRecord("vis/0005/0005_c04_s1_f1_vis.jpg", 1, 4, VISIBLE),
      ImageRecord("vis/0001/0001_c09_s2_f3_vis.jpg", 0, 9, VISIBLE),
      ImageRecord("nir/0005/0005_c06_s1_f1_nir.jpg", 1, 6, INFRARED),
      ImageRecord("nir/0001/0001_c02_s2_f3_nir.jpg", 0, 2, INFRARED),
      ImageRecord("nir/0001/0001_c07_s2_f9_nir.jpg", 0, 7, INFRARED)]
  assert train.num_classes == 2


def test_errors(tree, tmp_path):
  with pytest.raises(ValueError, match="direction"):
    llcm.query_set(tree, "visible_to_visible")
  with pytest.raises(DatasetError, match="does not exist"):
    llcm.train_set(str(tmp_path / "nowhere"))
  with open(os.path.join(tree, "idx", "train_nir.txt"), "a") as f:
    f.write("nir/0001/no_camera_here.jpg 1\n")
  os.makedirs(os.path.join(tree, "nir/0001"), exist_ok=True)
  open(os.path.join(tree, "nir/0001/no_camera_here.jpg"), "w").close()
  with pytest.raises(DatasetError, match=r"train_nir.txt: cannot tell the camera of nir/0001/no_camera_here"):
    llcm.train_set(tree)
  with open(os.path.join(tree, "idx", "test_id.txt"), "w") as f:
    f.write("3,8,99\n")
  with pytest.raises(DatasetError, match=r"test_id.txt have no test images: \[99\]"):
    llcm.query_set(tree)
  os.remove(os.path.join(tree, "idx", "test_id.txt"))
  with pytest.raises(DatasetError, match="idx/test_id.txt is missing"):
    llcm.gallery_set(tree)
