"""Synthetic benchmark: determinism, SYSU-MM01 layout, modality rendering, description noise."""
import dataclasses
import importlib.util
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines import sysu_mm01, synthetic
from data_pipelines.records import DatasetError

SETTINGS = dict(num_ids=30, images_per_camera=3, height=64, width=32, seed=7)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic") / "set")
  summary = synthetic.generate(root, **SETTINGS)
  with open(os.path.join(root, "synthetic.json")) as f:
    truth = {i["pid"]: i for i in json.load(f)["identities"]}
  return root, summary, truth


def _files(root):
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_byte_identical_for_a_seed_and_any_worker_count(tmp_path):
  small = dict(num_ids=5, images_per_camera=2, height=32, width=16, seed=3)
  a = _files(synthetic.generate(str(tmp_path / "a"), **small)["out"])
  b = _files(synthetic.generate(str(tmp_path / "b"), workers=2, **small)["out"])
  c = _files(synthetic.generate(str(tmp_path / "c"), **{**small, "seed": 4})["out"])
  assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
  assert a["descriptions.jsonl"] == b["descriptions.jsonl"]
  assert any(a[k] != c.get(k) for k in a)  # Another seed gives another data set.


def test_layout(dataset):
  root, summary, truth = dataset
  assert sorted(os.listdir(root)) == ["cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "descriptions.jsonl",
                                      "exp", "synthetic.json"]
  ids = {}
  for split in ("train", "val", "test"):
    text = open(os.path.join(root, "exp", f"{split}_id.txt")).read()
    assert re.fullmatch(r"\d+(,\d+)*\n", text)  # One line of comma-separated ids.
    ids[split] = [int(t) for t in text.strip().split(",")]
  all_ids = ids["train"] + ids["val"] + ids["test"]
  assert sorted(all_ids) == list(range(1, 31))
  assert len(ids["test"]) == 10 and 1 <= len(ids["val"]) <= 3
  count, missing = 0, 0
  for pid in all_ids:
    cams = [c for c in range(1, 7) if os.path.isdir(os.path.join(root, f"cam{c}", f"{pid:04d}"))]
    assert set(cams) & {1, 2, 4, 5} and set(cams) & {3, 6}  # Both modalities for everyone.
    assert tuple(cams) == tuple(truth[pid]["cameras"])
    missing += 6 - len(cams)
    for c in cams:
      names = sorted(os.listdir(os.path.join(root, f"cam{c}", f"{pid:04d}")))
      assert names == ["0001.jpg", "0002.jpg", "0003.jpg"]
      count += 3
  assert missing > 0  # Some identities are absent from some cameras.
  assert summary["images"] == count and sum(summary["images_per_camera"].values()) == count
  assert summary["ids"] == {"train": len(ids["train"]), "val": len(ids["val"]), "test": 10}
  # The SYSU-MM01 reader takes it as is.
  train = sysu_mm01.train_set(root)
  assert train.num_classes == 20
  infrared_folders = sum(1 for pid in ids["test"] for c in truth[pid]["cameras"] if c in (3, 6))
  assert len(sysu_mm01.query_set(root)) == 3 * infrared_folders


def test_modalities(dataset):
  root, _, _ = dataset
  spread = []
  for cam in range(1, 7):
    for directory, _, names in sorted(os.walk(os.path.join(root, f"cam{cam}"))):
      for name in sorted(names)[:1]:
        pixels = np.asarray(Image.open(os.path.join(directory, name)))
        assert pixels.shape == (64, 32, 3) and pixels.dtype == np.uint8
        channel_gap = np.abs(pixels.astype(int) - pixels[..., :1]).max()
        if cam in (3, 6):
          assert channel_gap == 0, f"colour in infrared image {directory}/{name}"
        else:
          spread.append(channel_gap)
  assert min(spread) > 30  # Every visible image carries colour.


def test_infrared_shows_material_not_colour():
  person = synthetic.sample_identity(0, 5, "train")
  other_colours = dataclasses.replace(
      person, upper_colour="green" if person.upper_colour != "green" else "red",
      lower_colour="white" if person.lower_colour != "white" else "black",
      hair_colour="blonde" if person.hair_colour != "blonde" else "black")
  other_material = dataclasses.replace(person, upper_material="leather" if person.upper_material != "leather"
                                       else "cotton", sleeve="long")
  for cam in (3, 6):
    ir = synthetic.render_image(person, cam, 1, 128, 64, seed=0)
    assert np.array_equal(ir, synthetic.render_image(other_colours, cam, 1, 128, 64, seed=0))
    assert not np.array_equal(ir, synthetic.render_image(other_material, cam, 1, 128, 64, seed=0))
  for cam in (1, 2, 4, 5):
    rgb = synthetic.render_image(person, cam, 1, 128, 64, seed=0)
    assert np.abs(rgb.astype(int) - synthetic.render_image(other_colours, cam, 1, 128, 64, seed=0)).max() > 60


def _load_simple_tokenizer():
  """OpenAI's reference BPE (clip/simple_tokenizer.py), loaded by file path (clip/__init__ fails)."""
  folder = os.path.dirname(importlib.util.find_spec("clip").origin)
  spec = importlib.util.spec_from_file_location("_clip_simple_tokenizer",
                                                os.path.join(folder, "simple_tokenizer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer()


def _slots(identity):
  """(slot, true colour, noun phrase that follows the colour word) of one identity."""
  upper = synthetic.UPPER_NOUNS[(identity["sleeve"], identity["upper_material"])]
  lower = synthetic.LOWER_NOUNS[(identity["lower_type"], identity["lower_material"])]
  slots = [("hair", identity["hair_colour"], "hair"),
           ("upper", identity["upper_colour"], upper),
           ("lower", identity["lower_colour"], lower),
           ("shoes", identity["shoe_colour"], identity["shoes"])]
  if identity["bag"] != "none":
    slots.append(("bag", identity["bag_colour"], identity["bag"]))
  return slots


def test_descriptions(dataset):
  root, summary, truth = dataset
  lines = open(os.path.join(root, "descriptions.jsonl"), encoding="utf-8").read().splitlines()
  records = [json.loads(line) for line in lines]
  images = sorted(os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                  for d, _, names in os.walk(root) for n in names if n.endswith(".jpg"))
  assert [r["image"] for r in records] == images  # Every image, train and test, in path order.
  tokenizer = _load_simple_tokenizer()
  colour_words = set(synthetic.COLOUR_WORDS)
  outcomes = {"visible": [], "infrared": []}
  for r in records:
    cam, pid = int(r["image"][3]), int(r["image"][5:9])
    infrared = cam in (3, 6)
    assert r["modality"] == ("infrared" if infrared else "visible")
    assert r["model"] and r["prompt"] and r["rewritten"] is None and r["flags"] == []
    text = r["description"]
    assert len(tokenizer.encode(text)) + 2 <= 77, text
    identity = truth[pid]
    assert re.search(rf"\b{identity['gender']}\b", text), text
    for slot, colour, noun in _slots(identity):
      match = re.search(rf"(\S+) {re.escape(noun)}(?![\w:-])", text)  # Not "hair:" of "hair: ...".
      assert match, (noun, text)
      word = match.group(1)
      outcome = ("missing" if word not in colour_words else "correct" if word == colour else "wrong")
      outcomes["infrared" if infrared else "visible"].append(outcome)
    if not infrared:
      assert ("striped" in text) == (identity["upper_pattern"] == "striped")
  assert set(outcomes["visible"]) == {"correct"}
  infrared = outcomes["infrared"]
  rates = {k: infrared.count(k) / len(infrared) for k in ("missing", "wrong", "correct")}
  assert len(outcomes["infrared"]) > 300
  assert abs(rates["missing"] - 0.5) < 0.08 and abs(rates["wrong"] - 0.25) < 0.07, rates


def test_noise_rates_are_settings(tmp_path):
  root = synthetic.generate(str(tmp_path / "clean"), num_ids=4, images_per_camera=2, height=32, width=16,
                            ir_colour_missing=0.0, ir_colour_wrong=0.0)["out"]
  with open(os.path.join(root, "synthetic.json")) as f:
    truth = {i["pid"]: i for i in json.load(f)["identities"]}
  for line in open(os.path.join(root, "descriptions.jsonl")):
    r = json.loads(line)
    for _, colour, noun in _slots(truth[int(r["image"][5:9])]):
      assert f"{colour} {noun}" in r["description"]
  with pytest.raises(ValueError, match="noise rates"):
    synthetic.generate(str(tmp_path / "bad"), num_ids=4, ir_colour_missing=0.8, ir_colour_wrong=0.3)


def test_refuses_non_empty_out(tmp_path, capsys):
  out = tmp_path / "set"
  small = ["--num_ids", "3", "--images_per_camera", "1", "--height", "32", "--width", "16"]
  assert synthetic.main(["--out", str(out)] + small) == 0
  assert "identities: " in capsys.readouterr().out
  assert synthetic.main(["--out", str(out)] + small) == 2
  assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
  (out / "cam1" / "stray.txt").write_text("x")
  assert synthetic.main(["--out", str(out), "--overwrite"] + small) == 0
  assert not (out / "cam1" / "stray.txt").exists()
  other = tmp_path / "mine"
  other.mkdir()
  (other / "thesis.tex").write_text("precious")
  with pytest.raises(DatasetError, match="refusing to overwrite"):
    synthetic.generate(str(other), num_ids=3, overwrite=True)
  assert (other / "thesis.tex").read_text() == "precious"
  with pytest.raises(ValueError, match="at least 3"):
    synthetic.generate(str(tmp_path / "tiny"), num_ids=2)
  assert not (tmp_path / "tiny").exists()


def test_val_fraction_moves_training_ids_only():
  a, b = synthetic.assign_splits(0, 120), synthetic.assign_splits(0, 120, val_fraction=0.2)
  test = lambda s: {p for p, v in s.items() if v == "test"}
  assert test(a) == test(b) and len(test(a)) == 40
  assert sum(v == "val" for v in a.values()) == 6 and sum(v == "val" for v in b.values()) == 24
  assert {p for p, v in b.items() if v != "test"} == {p for p, v in a.items() if v != "test"}
  with pytest.raises(ValueError, match="leaves no training identity"):
    synthetic.assign_splits(0, 12, val_fraction=0.7)


def test_ensure_synthetic_refuses_a_set_made_with_other_settings(tmp_path):
  import ml_collections
  from data_pipelines import datasets
  gen = dict(num_ids=4, images_per_camera=1, height=32, width=16, seed=0, val_fraction=0.3)
  cfg = ml_collections.ConfigDict(dict(root=str(tmp_path / "s"), generate=gen))
  datasets.ensure_synthetic(cfg)                     # generates
  assert os.path.isfile(tmp_path / "s" / synthetic.MARKER)
  datasets.ensure_synthetic(cfg)                     # same settings: reused
  cfg.generate.seed = 1
  with pytest.raises(DatasetError, match=r"seed: 0 there, 1 in config.dataset.generate"):
    datasets.ensure_synthetic(cfg)
