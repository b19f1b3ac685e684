"""eees_jax.diagnostics against plain loops and a hand-made attribute case."""
import math
from types import SimpleNamespace

import numpy as np

from data_pipelines.records import INFRARED, VISIBLE
from eees_jax import diagnostics


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_modality_gap_equals_a_plain_loop():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(11, 5))
  pids = np.array([1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4])
  modality = np.array([0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0])
  gaps = []
  for i in range(len(z)):
    intra = [np.linalg.norm(z[i] - z[j]) for j in range(len(z))
             if j != i and pids[j] == pids[i] and modality[j] == modality[i]]
    inter = [np.linalg.norm(z[i] - z[j]) for j in range(len(z))
             if pids[j] == pids[i] and modality[j] != modality[i]]
    if intra and inter:   # identity 3 has no intra partner, identity 4 no inter partner
      gaps.append(sum(inter) / len(inter) - sum(intra) / len(intra))
  assert len(gaps) == 6   # 4 of identity 1, the 2 infrared images of identity 2
  gap, objective = diagnostics.modality_gap(z, pids, modality)
  np.testing.assert_allclose(gap, np.mean(gaps), rtol=1e-6)
  np.testing.assert_allclose(objective, np.mean(np.square(gaps)), rtol=1e-6)


def test_teacher_agreement_equals_a_plain_loop():
  rng = np.random.default_rng(1)
  v = _unit(rng.normal(size=(9, 4)))
  t = _unit(rng.normal(size=(9, 4)))
  pids = np.array([5, 5, 5, 7, 7, 9, 9, 9, 9])
  temperature = 0.5
  ids = [5, 7, 9]
  mean = lambda x: x / np.linalg.norm(x)
  vbar = {c: mean(sum(v[i] for i in range(9) if pids[i] == c)) for c in ids}
  tbar = {c: mean(sum(t[i] for i in range(9) if pids[i] == c)) for c in ids}
  kls, top = [], []
  for i in range(9):
    c = pids[i]
    zc = mean(vbar[c] + tbar[c])
    tl = [math.exp(float(zc @ tbar[d]) / temperature) for d in ids]
    sl = [math.exp(float(v[i] @ tbar[d]) / temperature) for d in ids]
    p = [x / sum(tl) for x in tl]
    q = [x / sum(sl) for x in sl]
    kls.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)))
    top.append(ids[int(np.argmax(q))] == c)
  kl, agree = diagnostics.teacher_agreement(v, t, pids, temperature)
  np.testing.assert_allclose(kl, np.mean(kls), rtol=1e-6)
  assert agree == np.mean(top)


def test_attribute_retrieval_splits_stated_from_omitted_reads():
  # Sentences embed as one-hot vectors; the image features point at chosen sentences, so which
  # attribute value each image "reads" is known by construction.
  sentences = ["A man.", "A woman.", "A person carrying a backpack.", "A person carrying a handbag.",
               "A person wearing a cap.", "A person wearing a beanie."]
  basis = {s: np.eye(len(sentences))[i] for i, s in enumerate(sentences)}

  def embed_text(texts):
    return np.stack([basis[s] for s in texts])

  people = {1: dict(gender="woman", bag="backpack", headwear="cap"),
            2: dict(gender="man", bag="handbag", headwear="none")}
  records = [SimpleNamespace(path="a.jpg", pid=1, modality=VISIBLE),
             SimpleNamespace(path="b.jpg", pid=2, modality=INFRARED)]
  truths = {
      # Image a shows gender, bag and headwear; its caption states only gender.
      "a.jpg": {"visible": {"gender": "full", "bag": "full", "headwear": "full"},
                "stated": {"gender": {}}},
      # Image b shows gender and, from the front, only the straps of its bag (not probed).
      "b.jpg": {"visible": {"gender": "full", "bag": "partial"}, "stated": {"bag": {}}},
  }
  v = np.stack([
      basis["A woman."] + 0.5 * basis["A person carrying a handbag."] + 0.4 * basis["A person wearing a cap."],
      basis["A woman."] * 0.9 + basis["A man."] * 0.1,   # reads "woman": wrong for the man
  ])
  out = diagnostics.attribute_retrieval(v, records, truths, people, embed_text)
  # a: gender stated and read right; bag omitted, read wrong; headwear omitted, read right.
  # b: gender omitted, read wrong; bag partial, skipped; person 2 has no headwear.
  assert out["stated"] == {"gender": 1.0, "all": 1.0, "count": 1}
  assert out["omitted"]["bag"] == 0.0
  assert out["omitted"]["headwear"] == 1.0
  assert out["omitted"]["gender"] == 0.0
  assert out["omitted"]["count"] == 3
  np.testing.assert_allclose(out["omitted"]["all"], 1 / 3)


def test_modality_retrieval_equals_a_plain_loop():
  rng = np.random.default_rng(2)
  n = 24
  feats = rng.normal(size=(n, 6))
  pids = rng.integers(0, 5, n)
  modality = rng.integers(0, 2, n)
  camids = np.where(modality == VISIBLE, rng.integers(1, 3, n), rng.integers(3, 5, n))
  unit = _unit(feats)
  expected = {}
  for name, q_mod, g_mod in (("ir->vis", INFRARED, VISIBLE), ("vis->vis", VISIBLE, VISIBLE),
                             ("ir->ir", INFRARED, INFRARED)):
    r1, aps = [], []
    for i in range(n):
      if modality[i] != q_mod:
        continue
      gallery = [j for j in range(n) if modality[j] == g_mod
                 and not (pids[j] == pids[i] and camids[j] == camids[i])]
      ranked = sorted(gallery, key=lambda j: (-float(unit[i] @ unit[j]), j))
      hits = [pids[j] == pids[i] for j in ranked]
      if not any(hits):
        continue
      r1.append(hits[0])
      precision, found = [], 0
      for k, h in enumerate(hits):
        if h:
          found += 1
          precision.append(found / (k + 1))
      aps.append(sum(precision) / len(precision))
    expected[name] = (100 * np.mean(r1), 100 * np.mean(aps), len(r1))
  got = diagnostics.modality_retrieval(feats, pids, modality, camids)
  for name, (r1, ap, count) in expected.items():
    assert got[name]["queries"] == count > 0
    np.testing.assert_allclose([got[name]["rank1"], got[name]["mAP"]], [r1, ap], rtol=1e-6)


def test_modality_retrieval_hand_case():
  # Two people; the visible pictures of person 1 point the same way as its infrared one, person 2's
  # infrared picture points at person 1: infrared -> visible Rank-1 is 1 of 2.
  feats = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.2]])
  pids = np.array([1, 2, 1, 2])
  modality = np.array([VISIBLE, VISIBLE, INFRARED, INFRARED])
  camids = np.array([1, 2, 3, 6])
  got = diagnostics.modality_retrieval(feats, pids, modality, camids)
  assert got["ir->vis"]["rank1"] == 50.0
  assert got["ir->vis"]["mAP"] == 75.0   # person 2's match is second: AP 1/2
  # Same modality, other camera: visible 1 and 2 have no partner; infrared 1 and 2 neither.
  assert got["vis->vis"]["queries"] == 0 and got["ir->ir"]["queries"] == 0


def test_modality_retrieval_keeps_other_people_from_the_query_camera():
  # Visible only: A and B are person 1 on camera 1, C person 1 on camera 2, D person 2 on camera 1.
  # A query drops its own identity's pictures from its own camera (A and B for A) but keeps D, which
  # points almost the same way as A and B: it outranks C for them and for C itself.
  feats = np.array([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [1.0, 0.1]])
  pids = np.array([1, 1, 1, 2])
  modality = np.full(4, VISIBLE)
  camids = np.array([1, 1, 2, 1])
  got = diagnostics.modality_retrieval(feats, pids, modality, camids)["vis->vis"]
  assert got["queries"] == 3   # D has no partner
  assert got["rank1"] == 0.0
  # A: C second (AP 1/2); B: C second (1/2); C: D, then B, then A (AP (1/2 + 2/3) / 2).
  np.testing.assert_allclose(got["mAP"], 100 * (0.5 + 0.5 + (0.5 + 2 / 3) / 2) / 3, rtol=1e-6)


def test_feature_blocks_split_the_embed_layout():
  # Built the way EEES.embed lays a feature out: per view [l2 f (3 dims) | l2 v (2 dims)], the mirror
  # after the image. v identifies the person, f is noise: v alone must rank perfectly.
  rng = np.random.default_rng(5)
  pids = np.array([1, 2, 3, 1, 2, 3])
  modality = np.array([VISIBLE] * 3 + [INFRARED] * 3)
  camids = np.array([1, 1, 1, 3, 3, 3])
  v_of = {1: [1.0, 0.0], 2: [0.0, 1.0], 3: [-1.0, 0.0]}
  f, v, f_m, v_m = (_unit(rng.normal(size=(6, 3))), np.array([v_of[p] for p in pids]),
                    _unit(rng.normal(size=(6, 3))), np.array([v_of[p] for p in pids]))
  f, v, f_m, v_m = (x.astype(np.float32) for x in (f, v, f_m, v_m))
  feats = np.concatenate([f, v, f_m, v_m], axis=1)
  blocks = diagnostics.feature_blocks(feats, joint_dim=2, flip=True)
  np.testing.assert_array_equal(blocks["f"], np.concatenate([f, f_m], axis=1))
  np.testing.assert_array_equal(blocks["v"], np.concatenate([v, v_m], axis=1))
  np.testing.assert_array_equal(blocks["f+v"], feats)
  got = diagnostics.modality_retrieval(blocks["v"], pids, modality, camids)["ir->vis"]
  assert got["rank1"] == 100.0 and got["mAP"] == 100.0
  one_view = diagnostics.feature_blocks(feats[:, :5], joint_dim=2, flip=False)
  np.testing.assert_array_equal(one_view["f"], f)
  np.testing.assert_array_equal(one_view["v"], v)
  try:
    diagnostics.feature_blocks(feats[:, :9], joint_dim=2, flip=True)
  except ValueError as e:
    assert "9 dims" in str(e)
  else:
    raise AssertionError("an odd width must not split into two views")


def test_diagnose_reports_retrieval_on_the_split_and_on_training_ids(tiny_workdir):
  from data_pipelines import sysu_mm01
  out = diagnostics.diagnose(tiny_workdir["workdir"], tiny_workdir["root"], split="test")
  test_ids = set(sysu_mm01.split_ids(tiny_workdir["root"])["test"])
  train = sysu_mm01.training_records(tiny_workdir["root"], len(test_ids))
  assert len({r.pid for r in train}) == len(test_ids)
  assert not {r.pid for r in train} & test_ids
  for which in ("test", "train"):
    for row in ("ir->vis", "vis->vis", "ir->ir"):
      cell = out["retrieval"][which][row]
      assert cell["queries"] > 0 and 0.0 <= cell["rank1"] <= 100.0
  assert set(out["blocks"]) == {"f+v", "f", "v"}
  assert out["blocks"]["f+v"] == out["retrieval"]["test"]["ir->vis"]
  md = diagnostics.markdown([out])
  assert "| train |" in md and "| test |" in md and "l2(BN f)" in md
  assert "train ids" in md


def test_diagnose_measures_cmsp_on_the_training_identities_with_their_own_captions(tiny_workdir):
  # Oracle: the pair gap of the training records, from their own descriptions, by a plain loop
  # over anchors (SPEC 3.6: Euclidean, mean intra-modality distance, anchors with both modalities).
  import os
  from data_pipelines import descriptions as descriptions_lib
  from data_pipelines import sysu_mm01, synthetic
  from eees_jax import inference
  root = tiny_workdir["root"]
  out = diagnostics.diagnose(tiny_workdir["workdir"], root, split="test")
  model = inference.load(tiny_workdir["workdir"])
  n_test = len(sysu_mm01.split_ids(root)["test"])
  records = sysu_mm01.training_records(root, n_test)
  texts = descriptions_lib.load_descriptions(os.path.join(root, synthetic.DESCRIPTIONS), records)
  feats = np.zeros((len(records), model.feature_dim), np.float32)
  for i, r in enumerate(records):
    feats[i] = model.embed_images([os.path.join(root, r.path)], r.modality)[0]
  v = model.joint_of(feats)
  z = v + model.embed_text(texts)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  gaps = []
  for i, r in enumerate(records):
    same = [j for j, q in enumerate(records) if q.pid == r.pid and j != i]
    intra = [np.linalg.norm(z[i] - z[j]) for j in same if records[j].modality == r.modality]
    inter = [np.linalg.norm(z[i] - z[j]) for j in same if records[j].modality != r.modality]
    if intra and inter:
      gaps.append(np.mean(inter) - np.mean(intra))
  assert gaps
  np.testing.assert_allclose(out["cmsp_train"]["pair_gap"], np.mean(gaps), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["cmsp_train"]["pair_objective"], np.mean(np.square(gaps)),
                             rtol=1e-4, atol=1e-6)
  assert out["cmsp_train"]["pair_gap"] != out["cmsp"]["pair_gap"]
