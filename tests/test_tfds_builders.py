"""TFDS builders: build from a tiny generated tree into tmp_path and read records and pixels back."""
import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import sysu_mm01, synthetic, tfds_builders
from data_pipelines.records import DatasetError, ImageRecord


def _manual(path):
  return tfds.download.DownloadConfig(manual_dir=str(path))


def _expected_splits(root):
  """Records by split from a plain walk of the tree (train: ids relabelled in sorted order)."""
  ids = {s: [int(t) for t in open(os.path.join(root, "exp", f"{s}_id.txt")).read().split(",")]
         for s in ("train", "val", "test")}
  label = {pid: i for i, pid in enumerate(sorted(ids["train"] + ids["val"]))}
  out = {"train": [], "test_visible": [], "test_infrared": []}
  for pid in sorted(ids["train"] + ids["val"] + ids["test"]):
    for cam in range(1, 7):
      folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
      for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        modality = 1 if cam in (3, 6) else 0
        if pid in label:
          out["train"].append(ImageRecord(f"cam{cam}/{pid:04d}/{name}", label[pid], cam, modality))
        else:
          split = "test_infrared" if modality else "test_visible"
          out[split].append(ImageRecord(f"cam{cam}/{pid:04d}/{name}", pid, cam, modality))
  return out


def test_synthetic_builder_round_trip(tmp_path):
  root = synthetic.generate(str(tmp_path / "set"), num_ids=6, images_per_camera=2, height=32, width=16,
                            seed=1)["out"]
  builder = tfds_builders.EeesSynthetic(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=_manual(root))
  expected = _expected_splits(root)
  assert set(builder.info.splits.keys()) == set(expected)
  texts = {json.loads(line)["image"]: json.loads(line)["description"]
           for line in open(os.path.join(root, "descriptions.jsonl"))}
  for split, records in expected.items():
    assert tfds_builders.split_records(builder, split) == records  # Same records, same order.
    raw = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    decoded = builder.as_dataset(split=split)
    for r, e, d in zip(records, tfds.as_numpy(raw), tfds.as_numpy(decoded)):
      data = open(os.path.join(root, r.path), "rb").read()
      assert e["image"] == data  # The JPEG is stored as it is on disk.
      reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
      assert d["image"].shape == reference.shape == (32, 16, 3)
      assert np.abs(d["image"].astype(int) - reference).mean() < 2.0  # TF vs PIL JPEG decoders.
      assert e["description"].decode() == texts[r.path]
  # The stored query split is the AGW query list, so evaluation can work from the TFDS records.
  assert tfds_builders.split_records(builder, "test_infrared") == sysu_mm01.query_set(root)


def test_regdb_builder_with_bmp(tmp_path):
  root = tmp_path / "RegDB"
  (root / "idx").mkdir(parents=True)
  rng = np.random.default_rng(0)
  pixels = {}
  for part, labels in (("train", (4, 9)), ("test", (1, 2))):
    for modality in ("visible", "thermal"):
      lines = []
      for label in labels:
        path = f"{modality.capitalize()}/{label}/{part}_{label}.bmp"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (12, 6, 3) if modality == "visible" else (12, 6), dtype=np.uint8)
        Image.fromarray(image).save(root / path)
        pixels[path] = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        lines.append(f"{path} {label}")
      (root / "idx" / f"{part}_{modality}_2.txt").write_text("\n".join(lines) + "\n")
  builder = tfds_builders.Regdb(config="split_2", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=_manual(root))
  train = list(tfds.as_numpy(builder.as_dataset(split="train")))
  assert [(e["path"].decode(), e["pid"], e["camid"], e["modality"]) for e in train] == [
      ("Visible/4/train_4.bmp", 0, 1, 0), ("Visible/9/train_9.bmp", 1, 1, 0),
      ("Thermal/4/train_4.bmp", 0, 2, 1), ("Thermal/9/train_9.bmp", 1, 2, 1)]
  for split in ("test_visible", "test_infrared"):
    for e in tfds.as_numpy(builder.as_dataset(split=split)):
      assert np.array_equal(e["image"], pixels[e["path"].decode()])  # BMP is lossless.
      assert e["pid"] in (1, 2)


def test_truncated_image_fails_with_its_name(tmp_path):
  root = synthetic.generate(str(tmp_path / "set"), num_ids=3, images_per_camera=1, height=32, width=16)["out"]
  victim = os.path.join(root, sysu_mm01.query_set(root)[0].path)
  data = open(victim, "rb").read()
  with open(victim, "wb") as f:
    f.write(data[: len(data) // 2])
  builder = tfds_builders.EeesSynthetic(data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DatasetError, match=f"cannot read image {victim}"):
    builder.download_and_prepare(download_config=_manual(root))
