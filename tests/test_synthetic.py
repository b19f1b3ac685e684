"""Synthetic benchmark: determinism, SYSU-MM01 layout, modality rendering, description noise."""
import collections
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
  assert sorted(os.listdir(root)) == ["cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "captions.jsonl",
                                      "descriptions.jsonl", "exp", "synthetic.json"]
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


# The nouns a caption can use for each slot: a slot the caption does not state uses none of them.
_NOUNS = {"upper": sorted(set(synthetic.UPPER_NOUNS.values()), key=len, reverse=True),
          "lower": sorted(set(synthetic.LOWER_NOUNS.values()), key=len, reverse=True),
          "shoes": ["sneakers", "boots"], "bag": ["backpack", "handbag"],
          "headwear": ["cap", "beanie"], "scarf": ["scarf"], "outer": ["vest"]}


def _truth_value(identity, slot):
  """What is true of `slot`, from synthetic.json alone (independent of the captioner's code)."""
  return {"gender": {"value": identity["gender"]}, "build": {"value": identity["build"]},
          "height": {"value": identity["height"]},
          "hair": {"length": identity["hair_length"], "colour": identity["hair_colour"]},
          "upper": {"noun": synthetic.UPPER_NOUNS[(identity["sleeve"], identity["upper_material"])],
                    "colour": identity["upper_colour"]},
          "lower": {"noun": synthetic.LOWER_NOUNS[(identity["lower_type"], identity["lower_material"])],
                    "colour": identity["lower_colour"]},
          "shoes": {"noun": identity["shoes"], "colour": identity["shoe_colour"]},
          "bag": {"noun": identity["bag"], "colour": identity["bag_colour"]},
          "headwear": {"noun": identity["headwear"], "colour": identity["headwear_colour"]},
          "scarf": {"noun": "scarf", "colour": identity["scarf_colour"]},
          "outer": {"noun": "vest", "colour": identity["outer_colour"]}}[slot]


def _caption_data(root):
  captions = {json.loads(l)["image"]: json.loads(l)
              for l in open(os.path.join(root, "descriptions.jsonl"), encoding="utf-8")}
  truths = [json.loads(l) for l in open(os.path.join(root, "captions.jsonl"), encoding="utf-8")]
  return captions, truths


def test_captions_state_a_subset_of_what_the_image_shows(dataset):
  root, _, truth = dataset
  captions, truths = _caption_data(root)
  images = sorted(os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/")
                  for d, _, names in os.walk(root) for n in names if n.endswith(".jpg"))
  assert sorted(captions) == images and [t["image"] for t in truths] == images
  tokenizer = _load_simple_tokenizer()
  counts, errors, colour = collections.Counter(), collections.Counter(), collections.Counter()
  union = collections.defaultdict(set)
  for t in truths:
    identity, infrared = truth[t["pid"]], t["camid"] in (3, 6)
    text = captions[t["image"]]["description"]
    assert captions[t["image"]]["modality"] == ("infrared" if infrared else "visible")
    assert len(tokenizer.encode(text)) + 2 <= 48, text       # the synthetic text tower's context
    stated, visible = t["stated"], t["visible"]
    assert "gender" in stated and set(stated) <= set(visible), t
    stateable = [s for s in visible if s != "gender" and not (s == "build" and identity["build"] == "medium")
                 and not (s == "height" and identity["height"] == "average")]
    assert min(3, 1 + len(stateable)) <= len(stated) <= 6, t
    # Hidden parts are never visible: no shoes behind a railing / far away, no far-side handbag.
    if identity["bag"] == "none":
      assert "bag" not in visible
    for slot, nouns in _NOUNS.items():
      mentioned = [n for n in nouns if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]
      if slot not in stated:
        assert not mentioned, (slot, text)
      else:
        said = stated[slot]["said"]
        assert said["noun"] in mentioned, (slot, text)
        if said.get("colour") and not stated[slot].get("partial"):
          assert f"{said['colour']} {said['noun']}" in text, (slot, text)
    assert re.search(rf"\b{stated['gender']['said']['value']}\b", text), text
    # The recorded correctness agrees with synthetic.json.
    for slot, s in stated.items():
      true = _truth_value(identity, slot)
      ok = all(s["said"][k] == v for k, v in true.items()
               if not (k == "colour" and s.get("colour") == "missing"))
      assert ok == s["correct"], (slot, s, true)
      counts[infrared] += 1
      errors[infrared] += not ok
      if "colour" in s and not s.get("partial"):
        colour[(infrared, s["colour"])] += 1
    union[t["pid"]] |= set(stated)
  # About 5% of stated attributes are wrong in visible captions (shape slots and colour mix-ups).
  assert abs(errors[False] / counts[False] - 0.05) < 0.02, errors
  # Infrared colour words: half missing, a quarter wrong (plus the 5% visible-style errors).
  ir = {k: colour[(True, k)] for k in ("missing", "wrong", "correct")}
  total = sum(ir.values())
  assert total > 300
  assert abs(ir["missing"] / total - 0.5) < 0.08 and abs(ir["wrong"] / total - 0.27) < 0.07, ir
  # Views of one person say different things: each caption misses something their union states.
  per_image = np.mean([len(t["stated"]) for t in truths])
  per_person = np.mean([len(u) for u in union.values()])
  assert per_image < 5 and per_person > per_image + 1.5, (per_image, per_person)


def test_caption_noise_settings(tmp_path):
  root = synthetic.generate(str(tmp_path / "clean"), num_ids=6, images_per_camera=2, height=32,
                            width=16, ir_colour_missing=0.0, ir_colour_wrong=0.0, visible_wrong=0.0,
                            min_slots=11, max_slots=11)["out"]
  _, truths = _caption_data(root)
  for t in truths:
    stateable = {s for s in t["visible"]}
    person = json.load(open(os.path.join(root, "synthetic.json")))["identities"][t["pid"] - 1]
    stateable -= {"build"} if person["build"] == "medium" else set()
    stateable -= {"height"} if person["height"] == "average" else set()
    assert set(t["stated"]) == stateable                       # max_slots=11: all that is shown
    assert all(s["correct"] for s in t["stated"].values())     # no noise: every statement right
  with pytest.raises(ValueError, match="noise rates"):
    synthetic.generate(str(tmp_path / "bad"), num_ids=4, ir_colour_missing=0.8, ir_colour_wrong=0.3)
  with pytest.raises(ValueError, match="min_slots"):
    synthetic.generate(str(tmp_path / "bad2"), num_ids=4, min_slots=5, max_slots=4)


def _find_plan(seed, pid, camid, **want):
  for index in range(1, 400):
    plan = synthetic.image_plan(seed, pid, camid, index)
    if all(getattr(plan, k) == v for k, v in want.items()):
      return index, plan
  raise AssertionError(f"no image plan with {want}")


def test_what_a_view_shows_is_what_is_drawn():
  base = dataclasses.replace(synthetic.sample_identity(0, 5, "train"), bag="handbag",
                             bag_material="leather", bag_colour="red", upper_colour="blue",
                             lower_type="trousers", lower_material="denim")
  no_bag = dataclasses.replace(base, bag="none", bag_material="none", bag_colour="none")

  def bag_pixels(index):  # pixels the handbag changes in camera 1
    a = synthetic.render_image(base, 1, index, 128, 64, seed=0).astype(int)
    b = synthetic.render_image(no_bag, 1, index, 128, 64, seed=0).astype(int)
    return int((np.abs(a - b).max(axis=2) > 40).sum())

  near, plan = _find_plan(0, 5, 1, view="side", handbag_near=True, distance="near", occluder="none")
  assert synthetic.visible_parts(base, plan)["bag"] == "full"
  far, plan = _find_plan(0, 5, 1, view="side", handbag_near=False, distance="near", occluder="none")
  assert "bag" not in synthetic.visible_parts(base, plan)
  assert bag_pixels(far) < 0.25 * bag_pixels(near), (bag_pixels(far), bag_pixels(near))
  front, plan = _find_plan(0, 5, 1, view="front", distance="near")
  backpack = dataclasses.replace(base, bag="backpack", bag_material="nylon")
  assert synthetic.visible_parts(backpack, plan)["bag"] == "partial"   # straps only
  _, plan = _find_plan(0, 5, 1, view="back")
  assert synthetic.visible_parts(backpack, plan)["bag"] == "full"
  _, plan = _find_plan(0, 5, 1, distance="far")
  parts = synthetic.visible_parts(base, plan)
  assert "shoes" not in parts and "bag" not in parts                   # too small to name
  _, plan = _find_plan(0, 5, 1, occluder="legs", distance="near")
  assert "shoes" not in synthetic.visible_parts(base, plan)


def test_attribute_oracle_on_a_hand_made_set():
  from data_pipelines.synthetic import identities, oracle
  make = lambda pid, cams, **kw: dataclasses.replace(synthetic.sample_identity(0, 1, "test"), pid=pid,
                                                      cameras=cams, **kw)
  people = [make(1, (1, 3)), make(2, (2, 3, 6)),                      # same infrared attributes
            make(3, (4, 6), upper_colour="red"),                       # differs by colour only: same
            make(4, (1, 3), bag="handbag", bag_material="leather"),    # unique
            make(5, (5, 6), split="train")]                            # not a test id
  # Queries (2 images per infrared camera): ids 1, 2, 3 share attributes -> 1/3 each; id 4 -> 1.
  # Weighted by queries: (2 * 1/3 + 4 * 1/3 + 2 * 1/3 + 2 * 1) / 10 = 46.67%.
  assert oracle.expected_rank1(people, 2, mode="all") == pytest.approx(100 * (8 / 3 + 2) / 10)
  # Indoor gallery (cameras 1, 2): id 3 has no indoor image, so it is neither gallery nor query:
  # ids 1 and 2 share (1/2 each), id 4 unique -> (2 * 1/2 + 4 * 1/2 + 2 * 1) / 8.
  assert oracle.expected_rank1(people, 2, mode="indoor") == pytest.approx(100 * 5 / 8)
  assert oracle.distinct_signatures(people) == (4, 1)
  # The cross-modal oracle ignores materials (invisible in colour images): a person who differs from
  # id 1 by the material of the top alone is unique to the infrared oracle, not to the shared one.
  other = "wool" if people[0].upper_material != "wool" else "cotton"
  people.append(make(6, (2, 3), upper_material=other))
  infrared = (2 * 1 / 3 + 4 * 1 / 3 + 2 * 1 / 3 + 2 * 1 + 2 * 1) / 12
  shared = (2 * 1 / 4 + 4 * 1 / 4 + 2 * 1 / 4 + 2 * 1 + 2 * 1 / 4) / 12
  assert oracle.expected_rank1(people, 2, mode="all") == pytest.approx(100 * infrared)
  assert oracle.expected_rank1(people, 2, mode="all",
                               attributes=identities.SHARED_ATTRIBUTES) == pytest.approx(100 * shared)


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
  with pytest.raises(DatasetError, match=r"seed: 0 there, 1 in the config"):
    datasets.ensure_synthetic(cfg)
  cfg.generate.seed = 0
  marker = tmp_path / "s" / synthetic.MARKER
  old = json.loads(marker.read_text())
  marker.write_text(json.dumps({**old, "version": 1}))
  with pytest.raises(DatasetError, match="generator version 1"):
    datasets.ensure_synthetic(cfg)
  marker.write_text(json.dumps(old))
  # visible_only is recorded only when on: absent in the set or the config means off.
  cfg.generate.visible_only = False
  datasets.ensure_synthetic(cfg)                     # the set records no visible_only: reused
  pre = ml_collections.ConfigDict(dict(root=str(tmp_path / "p"), generate=dict(
      gen, purpose="pretrain", visible_only=True)))
  datasets.ensure_synthetic(pre)
  del pre.generate["visible_only"]
  with pytest.raises(DatasetError, match=r"visible_only: True there, False in the config"):
    datasets.ensure_synthetic(pre)


def test_a_kill_while_publishing_leaves_a_usable_folder(tmp_path, monkeypatch):
  """Killed between the renames that swap the new set in: the next run regenerates, never refuses."""
  import ml_collections
  from data_pipelines import datasets
  from data_pipelines.synthetic import writer
  gen = dict(num_ids=4, images_per_camera=1, height=32, width=16, seed=0, val_fraction=0.3)
  cfg = ml_collections.ConfigDict(dict(root=str(tmp_path / "s"), generate=gen))
  datasets.ensure_synthetic(cfg)
  real_replace = os.replace

  def dying_replace(src, dst):
    if os.fspath(dst) == cfg.root:   # the old set is retired, the new one not yet in place
      raise KeyboardInterrupt("simulated kill")
    return real_replace(src, dst)

  monkeypatch.setattr(writer.os, "replace", dying_replace)
  with pytest.raises(KeyboardInterrupt):
    synthetic.generate(cfg.root, overwrite=True, **{**gen, "seed": 1})
  monkeypatch.setattr(writer.os, "replace", real_replace)
  assert not os.path.exists(cfg.root)                 # neither half of a set ...
  datasets.ensure_synthetic(cfg)                      # ... so the next run simply generates
  assert json.load(open(tmp_path / "s" / synthetic.MARKER))["settings"]["seed"] == 0
  assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # leftovers removed


def test_pretraining_set_has_only_training_identities(tmp_path):
  summary = synthetic.generate(str(tmp_path / "p"), num_ids=5, images_per_camera=1, height=32,
                               width=16, seed=11, purpose="pretrain")
  assert summary["ids"] == {"pretrain": 5} and summary["oracle"] is None
  assert open(tmp_path / "p" / "exp" / "train_id.txt").read() == "1,2,3,4,5\n"
  assert open(tmp_path / "p" / "exp" / "test_id.txt").read() == "\n"
  people = json.load(open(tmp_path / "p" / synthetic.MARKER))["identities"]
  assert people[0] == json.loads(json.dumps(dataclasses.asdict(synthetic.sample_identity(11, 1, "pretrain"))))


def test_visible_only_pretraining_set_is_the_full_sets_visible_part(tmp_path):
  """visible_only renders no infrared image; every other file entry is the full set's, byte for
  byte, and the captions of the visible images are the same."""
  small = dict(num_ids=6, images_per_camera=1, height=32, width=16, seed=12, purpose="pretrain")
  full = _files(synthetic.generate(str(tmp_path / "full"), **small)["out"])
  summary = synthetic.generate(str(tmp_path / "vis"), visible_only=True, **small)
  vis = _files(summary["out"])
  images = lambda files: {k for k in files if k.endswith(".jpg")}
  infrared = {k for k in images(full) if k.startswith(("cam3", "cam6"))}
  assert infrared and images(vis) == images(full) - infrared
  assert all(vis[k] == full[k] for k in images(vis))
  lines = lambda files: [json.loads(l) for l in files["descriptions.jsonl"].decode().splitlines()]
  assert lines(vis) == [r for r in lines(full) if not r["image"].startswith(("cam3", "cam6"))]
  assert summary["settings"]["visible_only"] is True
  assert "visible_only" not in json.loads(full["synthetic.json"])["settings"]
  assert json.loads(vis["synthetic.json"])["identities"] == json.loads(full["synthetic.json"])["identities"]
  with pytest.raises(ValueError, match="visible_only=True is for pretraining sets"):
    synthetic.generate(str(tmp_path / "bench"), num_ids=6, images_per_camera=1, height=32,
                       width=16, seed=12, visible_only=True)
