"""SYSU-MM01 reader: train relabelling, AGW query/gallery lists, official gallery, error messages."""
import io
import os
import random

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images, sysu_mm01
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord

TRAIN, VAL, TEST = [2, 5, 7, 9, 11], [3, 13], [1, 4, 6, 8, 10, 12, 14]


def _make_tree(root, seed=0):
  """A SYSU-like tree: ids missing from some cameras, 1..14 files per folder, gaps in file numbers."""
  rng = np.random.default_rng(seed)
  for cam in range(1, 7):
    os.makedirs(os.path.join(root, f"cam{cam}"))
  for pid in TRAIN + VAL + TEST:
    cams = [c for c in range(1, 7) if rng.random() < 0.7] or [1]
    if pid == 6:
      cams = [3]  # A test id with infrared images only.
    for cam in cams:
      folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
      os.makedirs(folder)
      numbers = sorted(rng.choice(np.arange(1, 30), size=int(rng.integers(1, 15)), replace=False))
      for n in numbers[::-1]:  # Creation order differs from sorted order.
        with open(os.path.join(folder, f"{int(n):04d}.jpg"), "wb") as f:
          f.write(b"not decoded by the list readers")
  os.makedirs(os.path.join(root, "exp"))
  for name, ids in (("train", TRAIN), ("val", VAL), ("test", TEST)):
    with open(os.path.join(root, "exp", f"{name}_id.txt"), "w") as f:
      f.write(",".join(str(i) for i in ids) + "\n")


@pytest.fixture
def tree(tmp_path):
  root = str(tmp_path / "SYSU-MM01")
  _make_tree(root)
  return root


# An independent transcription of the AGW code base's process_query_sysu / process_gallery_sysu
# (global random, full paths, camera/id parsed from fixed character positions), extended with the
# documented multi-shot rule for folders of fewer than `shots` files.
def _agw_ids(data_path):
  with open(os.path.join(data_path, "exp/test_id.txt")) as file:
    ids = file.read().splitlines()
    ids = [int(y) for y in ids[0].split(",")]
    return ["%04d" % x for x in ids]


def _agw_query(data_path):
  files_ir = []
  for id in sorted(_agw_ids(data_path)):
    for cam in ["cam3", "cam6"]:
      img_dir = os.path.join(data_path, cam, id)
      if os.path.isdir(img_dir):
        files_ir.extend(sorted([img_dir + "/" + i for i in os.listdir(img_dir)]))
  return [(p[len(data_path) + 1:], int(p[-13:-9]), int(p[-15])) for p in files_ir]


def _agw_gallery(data_path, mode, trial, shots):
  random.seed(trial)
  rgb_cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
  files_rgb = []
  for id in sorted(_agw_ids(data_path)):
    for cam in rgb_cameras:
      img_dir = os.path.join(data_path, cam, id)
      if os.path.isdir(img_dir):
        new_files = sorted([img_dir + "/" + i for i in os.listdir(img_dir)])
        if shots == 1:
          files_rgb.append(random.choice(new_files))
        elif len(new_files) >= shots:
          files_rgb.extend(random.sample(new_files, shots))
        else:
          files_rgb.extend(new_files)
  return [(p[len(data_path) + 1:], int(p[-13:-9]), int(p[-15])) for p in files_rgb]


def _triples(records):
  return [(r.path, r.pid, r.camid) for r in records]


@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_query_matches_agw(tree, mode):
  query = sysu_mm01.query_set(tree, mode)
  assert _triples(query) == _agw_query(tree)
  assert all(r.modality == INFRARED for r in query)


@pytest.mark.parametrize("mode", ["all", "indoor"])
@pytest.mark.parametrize("shots", [1, 10])
def test_gallery_matches_agw(tree, mode, shots):
  draws = set()
  for trial in range(10):
    gallery = sysu_mm01.gallery_set(tree, mode, trial, shots)
    expected = _agw_gallery(tree, mode, trial, shots)
    assert _triples(gallery) == expected, f"trial {trial}"
    assert all(r.modality == VISIBLE for r in gallery)
    draws.add(tuple(expected))
  assert len(draws) > 1  # Trials draw different galleries.


def test_gallery_from_records_ignores_input_order(tree):
  records = sysu_mm01.test_records(tree)
  shuffled = list(records)
  random.Random(3).shuffle(shuffled)
  for trial in (0, 7):
    assert (sysu_mm01.select_gallery(shuffled, "all", trial, 1)
            == sysu_mm01.gallery_set(tree, "all", trial, 1))


def test_gallery_leaves_global_random_alone(tree):
  random.seed(123)
  expected = random.random()
  random.seed(123)
  sysu_mm01.gallery_set(tree, "all", 5)
  assert random.random() == expected


def test_train_set_relabels_sorted_ids(tree):
  train = sysu_mm01.train_set(tree)
  ids = sorted(TRAIN + VAL)
  assert train.num_classes == len(ids) == 7
  expected = []
  for label, pid in enumerate(ids):  # Hand-rolled listing: by id, camera, file name.
    for cam in range(1, 7):
      folder = os.path.join(tree, f"cam{cam}", f"{pid:04d}")
      if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
          expected.append(ImageRecord(f"cam{cam}/{pid:04d}/{name}", label, cam,
                                      INFRARED if cam in (3, 6) else VISIBLE))
  assert list(train.records) == expected
  assert train.root == tree
  assert {r.pid for r in train.records} == set(range(7))
  infrared = train.of_modality(INFRARED)
  assert all(train.records[i].camid in (3, 6) for i in infrared)


def test_test_records_cover_all_cameras(tree):
  records = sysu_mm01.test_records(tree)
  assert {r.pid for r in records} == set(TEST)
  assert [r for r in records if r.camid in (3, 6)] == sysu_mm01.query_set(tree)


def _official_mat(root, trials=10):
  """A rand_perm_cam.mat shaped like the data set's: 6 camera cells of per-id (trials, n) rows."""
  import scipy.io
  rng = np.random.default_rng(1)
  cams = np.empty((6, 1), dtype=object)
  truth = {}
  for cam in range(1, 7):
    per_id = np.empty((14, 1), dtype=object)
    for pid in range(1, 15):
      folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
      numbers = sorted(int(n[:4]) for n in os.listdir(folder)) if os.path.isdir(folder) else []
      if numbers:
        rows = np.asarray([rng.permutation(numbers) for _ in range(trials)], dtype=np.float64)
        truth[(cam, pid)] = rows
        per_id[pid - 1, 0] = rows
      else:
        per_id[pid - 1, 0] = np.zeros((0, 0))
    cams[cam - 1, 0] = per_id
  scipy.io.savemat(os.path.join(root, "exp", "rand_perm_cam.mat"), {"rand_perm_cam": cams})
  return truth


@pytest.mark.parametrize("shots", [1, 10])
def test_official_gallery(tree, shots):
  truth = _official_mat(tree)
  for mode, cams in (("all", (1, 2, 4, 5)), ("indoor", (1, 2))):
    for trial in (0, 9):
      expected = [(f"cam{cam}/{pid:04d}/{int(n):04d}.jpg", pid, cam)
                  for pid in sorted(TEST) for cam in cams if (cam, pid) in truth
                  for n in truth[(cam, pid)][trial][:shots]]
      gallery = sysu_mm01.gallery_set(tree, mode, trial, shots, source="official")
      assert _triples(gallery) == expected
  with pytest.raises(DatasetError, match="trial 10 requested"):
    sysu_mm01.gallery_set(tree, "all", 10, source="official")


def test_official_gallery_needs_the_file(tree):
  with pytest.raises(DatasetError, match="rand_perm_cam.mat is missing"):
    sysu_mm01.gallery_set(tree, "all", 0, source="official")


# ------------------------------------------------------------------------------ bad inputs

def test_missing_root(tmp_path):
  with pytest.raises(DatasetError, match="does not exist"):
    sysu_mm01.train_set(str(tmp_path / "nowhere"))


def test_missing_camera_folder(tree):
  os.rename(os.path.join(tree, "cam4"), os.path.join(tree, "cam4_moved"))
  with pytest.raises(DatasetError, match="cam4"):
    sysu_mm01.query_set(tree)


@pytest.mark.parametrize("name", ["train_id.txt", "val_id.txt", "test_id.txt"])
def test_missing_exp_file(tree, name):
  os.remove(os.path.join(tree, "exp", name))
  with pytest.raises(DatasetError, match=f"exp/{name} is missing"):
    sysu_mm01.train_set(tree)


@pytest.mark.parametrize("content, message", [
    ("1,4,x6,8\n", r"test_id.txt: token 3 is 'x6'"),
    ("1,4,,8\n", r"test_id.txt: token 3 is ''"),
    ("1,4\n6,8\n", r"test_id.txt: expected one line.*found 2"),
    ("", r"test_id.txt: expected one line.*found 0"),
    ("1,4,4\n", r"test_id.txt: id\(s\) \[4\] listed more than once"),
])
def test_malformed_id_line(tree, content, message):
  with open(os.path.join(tree, "exp", "test_id.txt"), "w") as f:
    f.write(content)
  with pytest.raises(DatasetError, match=message):
    sysu_mm01.query_set(tree)


def test_id_in_two_splits(tree):
  with open(os.path.join(tree, "exp", "val_id.txt"), "w") as f:
    f.write("3,13,4\n")
  with pytest.raises(DatasetError, match=r"\[4\] are in both val_id.txt and test_id.txt"):
    sysu_mm01.train_set(tree)


def test_listed_id_without_images(tree):
  with open(os.path.join(tree, "exp", "train_id.txt"), "w") as f:
    f.write(",".join(str(i) for i in TRAIN + [20]) + "\n")
  with pytest.raises(DatasetError, match=r"1 id\(s\) listed in exp/train_id.txt.*have no images.*\[20\]"):
    sysu_mm01.train_set(tree)


def test_bad_mode(tree):
  with pytest.raises(ValueError, match="search mode"):
    sysu_mm01.gallery_set(tree, "outdoor", 0)


def _jpeg(path, size=(16, 32)):
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
      buffer, "JPEG")
  with open(path, "wb") as f:
    f.write(buffer.getvalue())
  return buffer.getvalue()


def test_truncated_and_unreadable_jpegs(tmp_path):
  good, cut, junk = (str(tmp_path / n) for n in ("good.jpg", "cut.jpg", "junk.jpg"))
  data = _jpeg(good)
  with open(cut, "wb") as f:
    f.write(data[: len(data) // 2])
  with open(junk, "wb") as f:
    f.write(b"this is no image")
  assert images.read_image(good).shape == (32, 16, 3)
  for path in (cut, junk):
    with pytest.raises(DatasetError, match=f"cannot read image {path}"):
      images.read_image(path)
  with pytest.raises(DatasetError, match="image not found"):
    images.read_image(str(tmp_path / "absent.jpg"))
  records = [ImageRecord(n, 0, 1, VISIBLE) for n in ("good.jpg", "cut.jpg", "junk.jpg")]
  with pytest.raises(DatasetError, match=r"2 of 3 images .* cannot be read") as e:
    images.check_images(str(tmp_path), records)
  assert "cut.jpg" in str(e.value) and "junk.jpg" in str(e.value)
  images.check_images(str(tmp_path), records[:1])


def test_grayscale_image_reads_as_three_equal_channels(tmp_path):
  path = str(tmp_path / "gray.jpg")
  Image.fromarray(np.arange(512, dtype=np.uint8).reshape(32, 16)).save(path)
  pixels = images.read_image(path)
  assert pixels.shape == (32, 16, 3)
  assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_holdout_train_set_keeps_val_ids_out(tree):
  full, held = sysu_mm01.train_set(tree), sysu_mm01.train_set(tree, holdout=True)
  assert full.num_classes == len(TRAIN + VAL) and held.num_classes == len(TRAIN)
  held_pids = {int(r.path.split("/")[1]) for r in held.records}
  assert held_pids == set(TRAIN)
  assert sorted({r.pid for r in held.records}) == list(range(len(TRAIN)))


def test_val_split_lists_are_the_agw_lists_of_the_val_ids(tree):
  query = sysu_mm01.query_set(tree, "all", split="val")
  galleries = {t: sysu_mm01.gallery_set(tree, "all", t, split="val") for t in range(3)}
  # The AGW transcription reads exp/test_id.txt: swap the val and test lists, then compare.
  exp = os.path.join(tree, "exp")
  for name, ids in (("test", VAL), ("val", TEST)):
    with open(os.path.join(exp, f"{name}_id.txt"), "w") as f:
      f.write(",".join(str(i) for i in ids) + "\n")
  assert _triples(query) == _agw_query(tree) and {r.pid for r in query} <= set(VAL)
  for t, gallery in galleries.items():
    assert _triples(gallery) == _agw_gallery(tree, "all", t, 1)


def test_val_split_errors(tree):
  with pytest.raises(ValueError, match="split must be one of"):
    sysu_mm01.query_set(tree, "all", split="train")
  with pytest.raises(ValueError, match="official rand_perm_cam.mat galleries cover the test ids only"):
    sysu_mm01.gallery_set(tree, "all", 0, source="official", split="val")
