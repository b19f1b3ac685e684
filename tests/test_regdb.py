"""RegDB list reader: relabelling, test lists, and the errors for bad lines and missing files."""
import os

import pytest

from data_pipelines import regdb
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord

# (path, label) per list of split 3; labels deliberately not 0..N-1 and not in order.
LISTS = {
    "train_visible_3": [("Visible/7/female_front_v_1.bmp", 7), ("Visible/2/male_back_v_1.bmp", 2),
                        ("Visible/7/female_front_v_2.bmp", 7), ("Visible/11/male_v_1.bmp", 11)],
    "train_thermal_3": [("Thermal/7/female_front_t_1.bmp", 7), ("Thermal/2/male_back_t_1.bmp", 2),
                        ("Thermal/11/male_t_1.bmp", 11)],
    "test_visible_3": [("Visible/4/a v 1.bmp", 4), ("Visible/9/b_v_1.bmp", 9)],
    "test_thermal_3": [("Thermal/4/a_t_1.bmp", 4), ("Thermal/9/b_t_1.bmp", 9), ("Thermal/9/b_t_2.bmp", 9)],
}


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / "RegDB"
  (root / "idx").mkdir(parents=True)
  for name, entries in LISTS.items():
    lines = []
    for path, label in entries:
      (root / path).parent.mkdir(parents=True, exist_ok=True)
      (root / path).write_bytes(b"BM")
      lines.append(f"{path} {label}")
    (root / "idx" / f"{name}.txt").write_text("\n".join(lines) + "\n\n")  # Trailing blank line.
  return str(root)


def test_train_set_relabels(tree):
  train = regdb.train_set(tree, 3)
  label = {2: 0, 7: 1, 11: 2}  # Sorted original labels -> 0..N-1, by hand.
  expected = ([ImageRecord(p, label[y], 1, VISIBLE) for p, y in LISTS["train_visible_3"]] +
              [ImageRecord(p, label[y], 2, INFRARED) for p, y in LISTS["train_thermal_3"]])
  assert list(train.records) == expected
  assert train.num_classes == 3
  assert train.root == tree


def test_test_sets_keep_labels(tree):
  visible, thermal = regdb.test_sets(tree, 3)
  assert visible == [ImageRecord("Visible/4/a v 1.bmp", 4, 1, VISIBLE),
                     ImageRecord("Visible/9/b_v_1.bmp", 9, 1, VISIBLE)]
  assert [(r.path, r.pid, r.camid, r.modality) for r in thermal] == [
      (p, y, 2, INFRARED) for p, y in LISTS["test_thermal_3"]]


@pytest.mark.parametrize("line, lineno", [("Visible/2/male_back_v_1.bmp", 2),
                                          ("Visible/2/male_back_v_1.bmp two", 2),
                                          ("Visible/2/male_back_v_1.bmp 2.0", 2)])
def test_bad_line_names_file_and_line(tree, line, lineno):
  path = os.path.join(tree, "idx", "train_visible_3.txt")
  lines = open(path).read().splitlines()
  lines[lineno - 1] = line
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with pytest.raises(DatasetError, match=rf"train_visible_3.txt:{lineno}: expected '<relative image path> "
                                         r"<integer label>'"):
    regdb.train_set(tree, 3)


def test_missing_image(tree):
  os.remove(os.path.join(tree, "Thermal/9/b_t_2.bmp"))
  with pytest.raises(DatasetError, match=r"test_thermal_3.txt:3: image Thermal/9/b_t_2.bmp not found"):
    regdb.test_sets(tree, 3)


def test_missing_list_and_root(tree, tmp_path):
  with pytest.raises(DatasetError, match=r"train_visible_4.txt is missing"):
    regdb.train_set(tree, 4)
  with pytest.raises(DatasetError, match="does not exist"):
    regdb.train_set(str(tmp_path / "nowhere"), 1)
  with pytest.raises(ValueError, match="1..10"):
    regdb.train_set(tree, 11)


def test_empty_list(tree):
  open(os.path.join(tree, "idx", "test_visible_3.txt"), "w").close()
  with pytest.raises(DatasetError, match="holds no images"):
    regdb.test_sets(tree, 3)
