"""The data set registry: one table from a data set name to its readers, protocol and settings."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import llcm as llcm_config, regdb as regdb_config, synthetic as synthetic_config
from data_pipelines import registry, synthetic, sysu_mm01
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord
from eees_jax.evaluation import metrics, protocols

TINY = dict(num_ids=10, num_test=3, images_per_camera=2, height=32, width=16,
             seed=2, val_fraction=0.3)


def feature(r: ImageRecord) -> np.ndarray:
  """Identity signal plus noise fixed by the path (no model)."""
  rng = np.random.default_rng(zlib.crc32(r.path.encode()))
  f = 0.9 * rng.standard_normal(16)
  f[r.pid % 16] += 1.0
  return f.astype(np.float32)


def extract(records):
  return np.stack([feature(r) for r in records])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp("registry")), **TINY)["out"]


def _synthetic(root, **eval_kw):
  c = synthetic_config.get_config()
  c.dataset.root = root
  c.dataset.generate.update(TINY)
  c.eval.update(trials=2, **eval_kw)
  return c


def test_names_and_unknown_names():
  assert set(registry.names()) == {"sysu", "regdb", "llcm", "synthetic"}
  with pytest.raises(DatasetError, match="'market1501' is not one of sysu, regdb, llcm, synthetic"):
    registry.get("market1501")


def test_sysu_protocol_with_every_option_from_the_config(root):
  config = _synthetic(root, modes=("all", "indoor"), shots=(1, 2))
  config.eval.rerank.update(enabled=True, k1=4, k2=2, lambda_value=0.2)
  results = registry.evaluate(extract, config)
  assert list(results["settings"]) == registry.settings(config) == [
      "all-search single-shot", "all-search single-shot (re-ranked)", "all-search 2-shot",
      "all-search 2-shot (re-ranked)", "indoor-search single-shot",
      "indoor-search single-shot (re-ranked)", "indoor-search 2-shot",
      "indoor-search 2-shot (re-ranked)"]
  assert registry.headline_setting(config) == "all-search single-shot"
  # Against the protocol called directly with the same options (the registry only routes them).
  want = protocols.evaluate_sysu(extract, root, modes=("all", "indoor"), shots=(1, 2), trials=2,
                                 rerank={"k1": 4, "k2": 2, "lambda_value": 0.2})
  assert results == want
  rr = results["settings"]["all-search single-shot (re-ranked)"]["trials"][1]
  assert rr["mAP"] != results["settings"]["all-search single-shot"]["trials"][1]["mAP"]


def test_holdout_scores_the_val_ids(root):
  config = _synthetic(root, modes=("all",))
  config.dataset.holdout = True
  results = registry.evaluate(extract, config)
  val = set(sysu_mm01.split_ids(root)["val"])
  query = sysu_mm01.query_set(root, split="val")
  assert {r.pid for r in query} == val
  assert results["settings"]["all-search single-shot"]["trials"][0]["num_queries"] == len(query)
  assert "held-out val ids" in registry.report_title(config)
  assert registry.load_train_set(config.dataset).num_classes == len(sysu_mm01.split_ids(root)["train"])


def _write_official_mat(root, trials=2):
  """exp/rand_perm_cam.mat listing, per camera and id, the image numbers in reverse order."""
  import scipy.io
  ids = sysu_mm01.split_ids(root)["test"]
  cams = np.empty((6, 1), dtype=object)
  for cam in range(1, 7):
    per_id = np.empty((max(ids), 1), dtype=object)
    for pid in range(1, max(ids) + 1):
      folder = os.path.join(root, f"cam{cam}", f"{pid:04d}")
      numbers = sorted(int(n[:4]) for n in os.listdir(folder)) if os.path.isdir(folder) else []
      per_id[pid - 1, 0] = (np.asarray([numbers[::-1]] * trials, np.float64) if numbers
                            else np.zeros((0, 0)))
    cams[cam - 1, 0] = per_id
  scipy.io.savemat(os.path.join(root, "exp", "rand_perm_cam.mat"), {"rand_perm_cam": cams})


def test_official_gallery_source(root):
  _write_official_mat(root)
  config = _synthetic(root, modes=("all",), gallery_source="official")
  results = registry.evaluate(extract, config)
  query = sysu_mm01.query_set(root)
  gallery = sysu_mm01.gallery_set(root, "all", 1, source="official")
  assert {r.path.rsplit("/", 1)[1] for r in gallery} == {"0002.jpg"}  # the last number first
  want = metrics.evaluate_features(extract(query), extract(gallery), [r.pid for r in query],
                                   [r.pid for r in gallery], [r.camid for r in query],
                                   [r.camid for r in gallery], protocol="sysu", metric="cosine")
  got = results["settings"]["all-search single-shot"]["trials"][1]
  assert got["mAP"] == pytest.approx(100 * want["mAP"])
  assert got["num_gallery"] == len(gallery)


def _llcm_records():
  out = []
  for p in (1, 2, 3, 4):
    out += [ImageRecord(f"test_vis/cam{c}/{p:04d}/{n}.jpg", p, c, VISIBLE) for c in (1, 2, 3)
            for n in range(2)]
    out += [ImageRecord(f"test_nir/cam{c}/{p:04d}/{n}.jpg", p, c, INFRARED) for c in (1, 4)
            for n in range(2)]
  return out


@pytest.mark.parametrize("layout", ["deen", "query_gallery"])
def test_llcm_layout_and_trials_from_the_config(monkeypatch, tmp_path, layout):
  recs = _llcm_records()
  monkeypatch.setattr(registry.get("llcm"), "folder_test_records", lambda root, ds, split: recs)
  config = llcm_config.get_config()
  config.dataset.root = str(tmp_path)
  config.eval.update(trials=3, llcm_layout=layout)
  results = registry.evaluate(extract, config)
  assert results["layout"] == layout
  assert list(results["settings"]) == registry.settings(config) == ["infrared to visible",
                                                                     "visible to infrared"]
  assert results == protocols.evaluate_llcm(extract, None, trials=3, layout=layout, records=recs)
  assert [t["trial"] for t in results["settings"]["visible to infrared"]["trials"]] == [0, 1, 2]


def test_regdb_scores_the_configured_split(monkeypatch, tmp_path):
  recs = ([ImageRecord(f"Visible/{p}_{n}.bmp", p, 1, VISIBLE) for p in range(5) for n in range(2)]
          + [ImageRecord(f"Thermal/{p}_{n}.bmp", p, 2, INFRARED) for p in range(5) for n in range(2)])
  seen = []
  monkeypatch.setattr(registry.get("regdb"), "folder_test_records",
                      lambda root, ds, split: seen.append(ds.split) or recs)
  config = regdb_config.get_config()
  config.dataset.update(root=str(tmp_path), split=7)
  results = registry.evaluate(extract, config)
  assert seen == [7]
  assert list(results["settings"]) == registry.settings(config) == ["visible to thermal",
                                                                     "thermal to visible"]
  v2t = results["settings"]["visible to thermal"]
  assert [t["split"] for t in v2t["trials"]] == [7]
  assert (v2t["query"], v2t["gallery"]) == ("visible", "infrared")


def test_training_set_errors_name_the_data_set_and_what_to_do(tmp_path):
  config = regdb_config.get_config()
  config.dataset.root = str(tmp_path / "missing")
  with pytest.raises(DatasetError, match="is not a folder. RegDB is distributed by its authors"):
    registry.load_train_set(config.dataset)
  config.dataset.holdout = True
  with pytest.raises(DatasetError, match="RegDB has none"):
    registry.load_train_set(config.dataset)


def test_ranked_list_sheet_of_the_headline_setting(root, tmp_path):
  config = _synthetic(root, modes=("all",), ranked_list_queries=3)
  calls = []
  counted = lambda recs: calls.append(len(recs)) or extract(recs)
  registry.ranked_list(counted, config, None)  # another process: extracts, draws nothing
  assert len(calls) == 2 and not list(tmp_path.iterdir())
  path = str(tmp_path / "ranked.png")
  registry.ranked_list(extract, config, path)
  sheet = Image.open(path)
  assert sheet.size[1] > 3 * 128  # three query rows of 128-pixel cells
