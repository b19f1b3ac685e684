"""Protocol runners on tiny data sets with a fake feature extractor (no model, no images read)."""
from __future__ import annotations

import collections
import os
import zlib

import numpy as np
import pytest

from data_pipelines import llcm, regdb, sysu_mm01
from data_pipelines.records import INFRARED, VISIBLE, ImageRecord
from eees_jax.evaluation import metrics, protocols
from test_metrics import agw_loop_oracle

DIM = 16


class FakeExtract:
  """Features = one-hot(pid) * signal + per-image noise (fixed by the path); counts every image."""

  def __init__(self, signal: float = 1.0, noise: float = 0.0):
    self.signal, self.noise = signal, noise
    self.calls = 0
    self.seen = collections.Counter()

  def feature(self, r: ImageRecord) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(r.path.encode()))
    f = self.noise * rng.standard_normal(DIM)
    f[r.pid % DIM] += self.signal
    return f.astype(np.float32)

  def __call__(self, records):
    self.calls += 1
    self.seen.update(r.path for r in records)
    return np.stack([self.feature(r) for r in records])


def _touch(path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "wb").close()


@pytest.fixture(scope="module")
def sysu_root(tmp_path_factory):
  """SYSU-MM01 layout: test ids 1..5 (3 images per visible camera, 2 per infrared camera; id 5 has
  no camera-2 images), train id 6, val id 7."""
  root = str(tmp_path_factory.mktemp("sysu"))
  os.makedirs(os.path.join(root, "exp"))
  for name, ids in (("train_id.txt", "6"), ("val_id.txt", "7"), ("test_id.txt", "1,2,3,4,5")):
    with open(os.path.join(root, "exp", name), "w") as f:
      f.write(ids + "\n")
  for pid in range(1, 8):
    for cam in range(1, 7):
      if pid == 5 and cam == 2:
        continue
      for n in range(1, (2 if cam in (3, 6) else 3) + 1):
        _touch(os.path.join(root, f"cam{cam}", f"{pid:04d}", f"{n:04d}.jpg"))
  return root


def test_sysu_perfect_features_score_100_and_each_image_is_extracted_once(sysu_root):
  extract = FakeExtract()
  res = protocols.evaluate_sysu(extract, sysu_root, modes=("all", "indoor"), shots=(1, 2),
                                trials=4)
  assert list(res["settings"]) == ["all-search single-shot", "all-search 2-shot",
                                   "indoor-search single-shot", "indoor-search 2-shot"]
  for name, s in res["settings"].items():
    assert s["query"] == "infrared" and s["gallery"] == "visible" and not s["reranked"]
    assert [t["trial"] for t in s["trials"]] == [0, 1, 2, 3]
    for row in s["trials"] + [s["mean"]]:
      for k in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP"):
        assert row[k] == pytest.approx(100.0), (name, k)
  # One extract call for the queries, one for the union of all gallery draws; no image twice.
  assert extract.calls == 2
  assert max(extract.seen.values()) == 1
  drawn = {r.path for mode in ("all", "indoor") for s in (1, 2) for t in range(4)
           for r in sysu_mm01.gallery_set(sysu_root, mode, t, shots=s)}
  queries = {r.path for r in sysu_mm01.query_set(sysu_root, "all")}
  assert set(extract.seen) == drawn | queries


def test_sysu_trials_score_their_own_gallery_draw(sysu_root):
  extract = FakeExtract(signal=1.0, noise=0.8)
  res = protocols.evaluate_sysu(extract, sysu_root, modes=("all",), trials=3)
  queries = sysu_mm01.query_set(sysu_root, "all")
  q_feats = np.stack([extract.feature(r) for r in queries])
  trials = res["settings"]["all-search single-shot"]["trials"]
  for t in range(3):
    gallery = sysu_mm01.gallery_set(sysu_root, "all", t)
    g_feats = np.stack([extract.feature(r) for r in gallery])
    want = agw_loop_oracle(metrics.cosine_distance(q_feats, g_feats), [r.pid for r in queries],
                           [r.pid for r in gallery], [r.camid for r in queries],
                           [r.camid for r in gallery], "sysu")
    got = trials[t]
    assert got["num_gallery"] == len(gallery) and got["num_queries"] == len(queries)
    assert got["rank1"] == pytest.approx(100 * want["cmc"][0])
    assert got["mAP"] == pytest.approx(100 * want["mAP"])
    assert got["mINP"] == pytest.approx(100 * want["mINP"])
    np.testing.assert_allclose(got["cmc"], 100 * want["cmc"])
  mean = res["settings"]["all-search single-shot"]["mean"]
  assert mean["mAP"] == pytest.approx(np.mean([t["mAP"] for t in trials]))
  # The draws differ, so the trials are not all the same.
  assert len({round(t["mAP"], 9) for t in trials}) > 1


def test_sysu_from_given_test_records_equals_from_the_folder(sysu_root):
  """Records passed in (e.g. from prepared TFDS splits) give the folder's lists and numbers."""
  records = sysu_mm01.test_records(sysu_root)
  from_folder = protocols.evaluate_sysu(FakeExtract(noise=0.8), sysu_root, trials=3, shots=(1, 2))
  given = protocols.evaluate_sysu(FakeExtract(noise=0.8), "not/a/folder", trials=3, shots=(1, 2),
                                  records=records)
  assert given == from_folder


def test_sysu_rejects_bad_extract_output(sysu_root):
  with pytest.raises(ValueError, match="one feature row per record"):
    protocols.evaluate_sysu(lambda recs: np.zeros((len(recs) + 1, 4), np.float32), sysu_root,
                            modes=("all",), trials=1)
  with pytest.raises(ValueError, match="mode"):
    protocols.evaluate_sysu(FakeExtract(), sysu_root, modes=("outdoor",), trials=1)


def _regdb_sets(split: int):
  """10 identities (pid offset by split), 3 visible and 3 thermal images each."""
  vis = [ImageRecord(f"Visible/{split}/{p}_{n}.bmp", 100 * split + p, 1, VISIBLE)
         for p in range(10) for n in range(3)]
  th = [ImageRecord(f"Thermal/{split}/{p}_{n}.bmp", 100 * split + p, 2, INFRARED)
        for p in range(10) for n in range(3)]
  return vis, th


def test_regdb_from_given_test_sets():
  res = protocols.evaluate_regdb(lambda s: FakeExtract(noise=0.9), "unused", splits=(2,),
                                 test_sets=_regdb_sets)
  v2t = res["settings"]["visible to thermal"]["trials"][0]
  assert v2t["split"] == 2 and v2t["num_queries"] == v2t["num_gallery"] == 30


def test_regdb_both_directions_per_split_model(monkeypatch):
  monkeypatch.setattr(regdb, "test_sets", lambda root, split: _regdb_sets(split))
  made = []

  def extract_for_split(split):
    made.append(split)
    return FakeExtract(signal=1.0, noise=0.0 if split != 3 else 0.9)

  res = protocols.evaluate_regdb(extract_for_split, "unused", splits=(1, 2, 3))
  assert made == [1, 2, 3]  # one model (extractor) per split
  assert res["trial_key"] == "split"
  assert list(res["settings"]) == ["visible to thermal", "thermal to visible"]
  v2t, t2v = res["settings"]["visible to thermal"], res["settings"]["thermal to visible"]
  assert (v2t["query"], v2t["gallery"]) == ("visible", "infrared")
  assert (t2v["query"], t2v["gallery"]) == ("infrared", "visible")
  assert v2t["cmc_kind"] == "standard"
  assert [t["split"] for t in v2t["trials"]] == [1, 2, 3]
  assert v2t["trials"][0]["rank1"] == pytest.approx(100) and v2t["trials"][0]["mAP"] == pytest.approx(100)
  # Split 3 (noisy) against the oracle, thermal -> visible.
  ext = FakeExtract(signal=1.0, noise=0.9)
  vis, th = _regdb_sets(3)
  want = agw_loop_oracle(metrics.cosine_distance(np.stack([ext.feature(r) for r in th]),
                                                 np.stack([ext.feature(r) for r in vis])),
                         [r.pid for r in th], [r.pid for r in vis], protocol="regdb")
  assert t2v["trials"][2]["mAP"] == pytest.approx(100 * want["mAP"])
  assert t2v["trials"][2]["rank1"] == pytest.approx(100 * want["cmc"][0])
  assert t2v["mean"]["mAP"] == pytest.approx(np.mean([t["mAP"] for t in t2v["trials"]]))


def _llcm_records():
  """3 identities; visible cameras 1, 2 (2 images each), infrared cameras 1, 4 (2 images each)."""
  recs = []
  for p in (1, 2, 3):
    for cam in (1, 2):
      recs += [ImageRecord(f"test_vis/cam{cam}/{p:04d}/{n}.jpg", p, cam, VISIBLE) for n in range(2)]
    for cam in (1, 4):
      recs += [ImageRecord(f"test_nir/cam{cam}/{p:04d}/{n}.jpg", p, cam, INFRARED) for n in range(2)]
  return recs


@pytest.mark.parametrize("layout", ["deen", "query_gallery"])
def test_llcm_directions_and_layouts(monkeypatch, layout):
  recs = _llcm_records()
  monkeypatch.setattr(llcm, "test_records", lambda root: recs)
  extract = FakeExtract(signal=1.0, noise=0.7)
  res = protocols.evaluate_llcm(extract, "unused", trials=2, layout=layout)
  assert res == protocols.evaluate_llcm(FakeExtract(1.0, 0.7), None, trials=2, layout=layout,
                                        records=recs)  # records passed in, e.g. from TFDS
  assert extract.calls == 1 and max(extract.seen.values()) == 1
  assert res["layout"] == layout
  i2v, v2i = res["settings"]["infrared to visible"], res["settings"]["visible to infrared"]
  assert (i2v["query"], i2v["gallery"]) == ("infrared", "visible") and "note" not in i2v
  assert i2v["trials"][0]["num_queries"] == 12 and i2v["trials"][0]["num_gallery"] == 6
  infrared = [r for r in recs if r.modality == INFRARED]
  visible = [r for r in recs if r.modality == VISIBLE]
  drawn_infrared = llcm.select_gallery(recs, "visible_to_infrared", 1)
  assert {(r.pid, r.camid) for r in drawn_infrared} == {(r.pid, r.camid) for r in infrared}
  assert len(drawn_infrared) == 6
  if layout == "deen":  # DEEN ranks all visible images for each drawn infrared image
    assert (v2i["query"], v2i["gallery"]) == ("infrared", "visible")
    assert "DEEN" in v2i["note"] and "each drawn infrared image" in v2i["note"]
    assert v2i["trials"][0]["num_queries"] == 6 and v2i["trials"][0]["num_gallery"] == 12
    q, g = drawn_infrared, visible
  else:
    assert (v2i["query"], v2i["gallery"]) == ("visible", "infrared") and "note" not in v2i
    q, g = visible, drawn_infrared
  feats = lambda rs: np.stack([extract.feature(r) for r in rs])
  want = agw_loop_oracle(metrics.cosine_distance(feats(q), feats(g)), [r.pid for r in q],
                         [r.pid for r in g], [r.camid for r in q], [r.camid for r in g], "llcm")
  assert v2i["trials"][1]["mAP"] == pytest.approx(100 * want["mAP"])
  np.testing.assert_allclose(v2i["trials"][1]["cmc"], 100 * want["cmc"])


def test_headline_and_summarize_small_gallery():
  res = metrics.evaluate(np.array([[0.1, 0.2, 0.3]]), [2], [1, 2, 3], protocol="regdb")
  row = protocols.summarize(res)
  assert row["rank1"] == 0 and row["rank5"] == row["rank20"] == 100  # gallery of 3 < rank 5
  results = {"settings": {"a": {"mean": {**row}}}}
  assert protocols.headline(results)["rank20"] == 100


# ---------------------------------------------------------------- k-reciprocal re-ranking

def _rerank_loop_oracle(q_g, q_q, g_g, k1, k2, lam):
  """The k-reciprocal re-ranking procedure, one image at a time (stable ranking)."""
  num_q = q_g.shape[0]
  dist = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32) ** 2
  dist = (dist / dist.max(axis=0)).T
  n = dist.shape[0]
  rank = np.argsort(dist, axis=1, kind="stable")

  def reciprocal(i, k):
    forward = rank[i, :k + 1]
    return [int(j) for j in forward if i in rank[j, :k + 1]]

  half = int(np.around(k1 / 2.0))
  v = np.zeros((n, n), np.float32)
  for i in range(n):
    r = reciprocal(i, k1)
    expansion = list(r)
    for c in r:
      rc = reciprocal(c, half)
      if len(set(rc) & set(r)) > 2.0 / 3.0 * len(rc):
        expansion += rc
    expansion = sorted(set(expansion))
    w = np.exp(-dist[i, expansion])
    v[i, expansion] = w / w.sum()
  if k2 != 1:
    v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
  out = np.zeros(q_g.shape, np.float32)
  for i in range(num_q):
    for j in range(q_g.shape[1]):
      s = sum(min(v[i, k], v[num_q + j, k]) for k in range(n))
      out[i, j] = (1 - s / (2 - s)) * (1 - lam) + dist[i, num_q + j] * lam
  return out


@pytest.mark.parametrize("k1,k2", [(4, 3), (5, 1), (7, 2)])
def test_rerank_matches_loop_oracle(k1, k2):
  from eees_jax.evaluation import reranking
  rng = np.random.default_rng(k1)
  pids = rng.integers(0, 4, 19)
  feats = np.eye(DIM, dtype=np.float32)[pids] + 0.6 * rng.standard_normal((19, DIM)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  q, g = feats[:6], feats[6:]
  e = lambda a, b: np.sqrt(np.maximum(2 - 2 * a @ b.T, 0)).astype(np.float32)
  got = reranking.k_reciprocal_rerank(q, g, k1=k1, k2=k2, lambda_value=0.3)
  want = _rerank_loop_oracle(e(q, g), e(q, q), e(g, g), k1, k2, 0.3)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_rerank_settings_are_labelled(monkeypatch):
  monkeypatch.setattr(regdb, "test_sets", lambda root, split: _regdb_sets(split))
  res = protocols.evaluate_regdb(lambda s: FakeExtract(noise=0.8), "unused", splits=(1,),
                                 directions=("visible_to_thermal",),
                                 rerank={"k1": 6, "k2": 3, "lambda_value": 0.3})
  assert list(res["settings"]) == ["visible to thermal", "visible to thermal (re-ranked)"]
  plain, rr = res["settings"].values()
  assert not plain["reranked"] and rr["reranked"]
  assert plain["trials"][0]["mAP"] != rr["trials"][0]["mAP"]
  with pytest.raises(ValueError, match="re-ranking option"):
    protocols.evaluate_regdb(lambda s: FakeExtract(), "unused", splits=(1,), rerank={"k": 3})
