"""Text-to-person retrieval: a hand-computed case, a plain-loop oracle, and a trained workdir."""
import json
import os
import random

import numpy as np
import pytest

from data_pipelines import sysu_mm01
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord
from eees_jax.evaluation import report, text_retrieval as tr

from test_metrics import agw_loop_oracle

T_IR = "text -> infrared (held-out visible captions)"
T_VIS = "text -> visible, {}-search (held-out visible captions)"
FUSION = "infrared + text -> visible, {}-search (held-out visible captions)"
IMAGE = "infrared -> visible, {}-search (l2(v) alone, reference for the fusion)"


def _rec(camid, pid, n):
  return ImageRecord(f"cam{camid}/{pid:04d}/{n:04d}.jpg", pid, camid,
                     sysu_mm01.camera_modality(camid))


def _unit(v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_hand_computed_case():
  """Two identities in a 3-d joint space; every number below is worked out by hand.

  Visible: id 1 has two cam1 images at e1; id 2 two cam1 images at e2 and one cam2 image at e3
  (always drawn). Infrared (cam3): id 1 at (0.6, 0.8, 0), nearer id 2's e2; id 2 at e2.
  Captions: id 1's cam1 images -> t1 = e1, id 2's cam1 images -> t2 = (0.6, 0, 0.8).
  Whichever cam1 image the draw takes, the other one's caption is the identity's one query.
  """
  e1, e2, e3 = np.eye(3, dtype=np.float32)
  t1, t2 = e1, np.array([0.6, 0.0, 0.8], np.float32)
  records = [_rec(1, 1, 1), _rec(1, 1, 2), _rec(3, 1, 1),
             _rec(1, 2, 1), _rec(1, 2, 2), _rec(2, 2, 1), _rec(3, 2, 1)]
  feature = {"cam1/0001": e1, "cam1/0002": e2, "cam2/0002": e3,
             "cam3/0001": np.array([0.6, 0.8, 0.0], np.float32), "cam3/0002": e2}
  captions = {"cam1/0001/0001.jpg": "one a", "cam1/0001/0002.jpg": "one b",
              "cam1/0002/0001.jpg": "two a", "cam1/0002/0002.jpg": "two b",
              "cam2/0002/0001.jpg": "two from camera two"}
  text = {"one a": t1, "one b": t1, "two a": t2, "two b": t2, "two from camera two": e1}
  calls = []

  def joint(recs):
    calls.append(len(recs))
    return np.stack([feature[r.path[:9]] for r in recs])

  res = tr.evaluate_text_retrieval(joint, lambda s: np.stack([text[x] for x in s]), records,
                                   captions, modes=("all",), trials=2)
  assert calls == [len(records)]  # every image extracted once
  assert list(res["settings"]) == [T_IR, T_VIS.format("all"), FUSION.format("all"),
                                   IMAGE.format("all")]
  want = {
      # q1 = t1: ir1 0.6 > ir2 0 (AP 1); q2 = t2: ir1 0.36 > ir2 0 (true match second: AP 1/2).
      T_IR: dict(rank1=50.0, mAP=75.0, mINP=75.0, num_queries=2, num_gallery=2),
      # q1: e1 first (AP 1). q2 keeps the camera-2 image (a text query has no camera): e3 0.8
      # (true), e1 0.6, e2 0 (true): AP (1 + 2/3) / 2 = 5/6, INP 2/3. With camera 3 it would be 1/2.
      T_VIS.format("all"): dict(rank1=100.0, mAP=100 * 11 / 12, mINP=100 * 5 / 6,
                                num_queries=2, num_gallery=3),
      # Fused: l2(ir1 + t1) ~ (1.6, 0.8, 0) -> e1 first; l2(ir2 + t2) ~ (0.6, 1, 0.8) -> e2 first
      # (the camera-2 image is hidden from these camera-3 queries).
      FUSION.format("all"): dict(rank1=100.0, mAP=100.0, mINP=100.0, num_queries=2,
                                 num_gallery=3),
      # Without text: ir1 ranks e2 (0.8) above e1 (0.6): AP 1/2; ir2 finds e2 first.
      IMAGE.format("all"): dict(rank1=50.0, mAP=75.0, mINP=75.0, num_queries=2, num_gallery=3),
  }
  for name, expected in want.items():
    setting = res["settings"][name]
    assert len(setting["trials"]) == 2
    for trial in setting["trials"]:
      for key, value in expected.items():
        assert trial[key] == pytest.approx(value, abs=1e-4), (name, key)
    assert setting["mean"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-4)
  assert res["settings"][T_IR]["query"] == "text"
  assert res["settings"][FUSION.format("all")]["query"] == "infrared + text"
  # The report renders the settings as labelled rows.
  markdown = report.results_markdown(res, "text retrieval")
  assert f"| {T_VIS.format('all')} | text → visible (see note) | plain | 100.00 |" in markdown
  # Text weight 0: the fusion is the image alone; 1: the text alone (with the camera-3 rule).
  alone = tr.evaluate_text_retrieval(joint, lambda s: np.stack([text[x] for x in s]), records,
                                     captions, trials=1, text_weight=0.0)["settings"]
  assert alone[FUSION.format("all")]["mean"]["mAP"] == pytest.approx(75.0, abs=1e-4)


def _oracle(records, joint, text, captions, mode, trial, weight):
  """Each setting's (query features, query pids, query cameras, gallery records) by plain loops."""
  gallery = sysu_mm01.select_gallery(records, mode, trial)  # the AGW draw of the image protocol
  in_gallery = set(r.path for r in gallery)
  held = []
  for r in records:
    if r.modality == VISIBLE and r.path not in in_gallery:
      held.append(r)
  out = {}
  out["text_vis"] = ([text[captions[r.path]] for r in held], [r.pid for r in held],
                     [0] * len(held), gallery)
  infrared = [r for r in records if r.camid in (3, 6)]
  out["text_ir"] = (out["text_vis"][0], out["text_vis"][1], out["text_vis"][2], infrared)
  fused, image, pids, cams, used = [], [], [], [], {}
  for q in infrared:
    mine = sorted((r for r in held if r.pid == q.pid), key=lambda r: r.path)
    if not mine:
      continue
    j = used.get(q.pid, 0)
    used[q.pid] = j + 1
    v = joint[q.path]
    t = text[captions[mine[j % len(mine)].path]]
    f = (1 - weight) * v / np.linalg.norm(v) + weight * t / np.linalg.norm(t)
    fused.append(f / np.linalg.norm(f))
    image.append(v)
    pids.append(q.pid)
    cams.append(q.camid)
  out["fusion"] = (fused, pids, cams, gallery)
  out["image"] = (image, pids, cams, gallery)
  return out


def test_against_a_plain_loop_oracle():
  rng = np.random.default_rng(4)
  records = []
  for pid in (3, 5, 8, 9, 12):
    for camid in range(1, 7):
      for n in range(1, int(rng.integers(0, 4)) + 1):
        records.append(_rec(camid, pid, n))
  joint = {r.path: _unit(rng.normal(size=6)) for r in records}
  captions = {r.path: f"caption {i % 7}" for i, r in enumerate(records) if r.modality == VISIBLE}
  text = {c: _unit(rng.normal(size=6)) for c in set(captions.values())}
  modes, trials, weight = ("all", "indoor"), (0, 1, 4), 0.3
  res = tr.evaluate_text_retrieval(lambda rs: np.stack([joint[r.path] for r in rs]),
                                   lambda s: np.stack([text[x] for x in s]), records, captions,
                                   modes=modes, trials=trials, text_weight=weight)
  checked = 0
  for mode in modes:
    for i, trial in enumerate(trials):
      want = _oracle(records, joint, text, captions, mode, trial, weight)
      want_ir = _oracle(records, joint, text, captions, "all", trial, weight)["text_ir"]
      for key, name in (("text_vis", T_VIS), ("fusion", FUSION), ("image", IMAGE), (None, T_IR)):
        q, q_pids, q_cams, g = want[key] if key else want_ir
        if key is None and mode != "all":
          continue
        g_feats = np.stack([joint[r.path] for r in g])
        dist = 1.0 - np.asarray([[float(np.dot(a, b)) for b in g_feats] for a in q])
        oracle = agw_loop_oracle(dist, q_pids, [r.pid for r in g], q_cams, [r.camid for r in g],
                                 protocol="sysu")
        got = res["settings"][name.format(mode)]["trials"][i]
        assert got["trial"] == trial and got["num_queries"] == len(q)
        assert got["mAP"] == pytest.approx(100 * oracle["mAP"], abs=1e-4)
        assert got["mINP"] == pytest.approx(100 * oracle["mINP"], abs=1e-4)
        assert got["cmc"] == pytest.approx(list(100 * oracle["cmc_unique"]), abs=1e-4)
        checked += 1
  assert checked == len(trials) * 7


def test_bad_inputs_are_named():
  records = [_rec(1, 1, 1), _rec(3, 1, 1)]
  joint = lambda rs: np.ones((len(rs), 2), np.float32)
  with pytest.raises(ValueError, match="1 of 1 visible test images have no description"):
    tr.evaluate_text_retrieval(joint, joint, records, {}, trials=1)
  with pytest.raises(ValueError, match="search mode must be one of"):
    tr.evaluate_text_retrieval(joint, joint, records, {"cam1/0001/0001.jpg": "x"}, modes=("out",))
  with pytest.raises(ValueError, match="text_weight"):
    tr.evaluate_text_retrieval(joint, joint, records, {"cam1/0001/0001.jpg": "x"},
                               text_weight=2.0)
  # One visible image per identity and camera: the single-shot gallery takes all of them, so no
  # caption is left to query with (was: a bare "empty distance matrix" from the metrics).
  with pytest.raises(DatasetError, match="text retrieval has no query.*eval.text_retrieval=False"):
    tr.evaluate_text_retrieval(joint, joint, records, {"cam1/0001/0001.jpg": "x"}, trials=1)


def _text_to_infrared_oracle(workdir, root, trial):
  """Text -> infrared of trial `trial` by plain loops (test_metrics.agw_loop_oracle) over the
  embeddings of inference.load: (number of queries, gallery size, oracle metrics)."""
  from data_pipelines import descriptions
  from eees_jax import inference
  model = inference.load(workdir)
  records = sysu_mm01.test_records(root)
  visible = [r for r in records if r.modality == VISIBLE]
  by_image = descriptions.read_records(os.path.join(root, "descriptions.jsonl"))
  gallery = set(r.path for r in sysu_mm01.select_gallery(records, "all", trial))
  held = [r for r in visible if r.path not in gallery]
  infrared = [r for r in records if r.modality == INFRARED]
  q = model.embed_text([by_image[r.path]["description"] for r in held])
  g = model.embed_joint([os.path.join(root, r.path) for r in infrared], "infrared")
  oracle = agw_loop_oracle(1.0 - q @ g.T, [r.pid for r in held], [r.pid for r in infrared],
                           [0] * len(held), [r.camid for r in infrared])
  return len(held), len(infrared), oracle


def _assert_matches_oracle(got, oracle):
  num_queries, num_gallery, metrics = oracle
  assert got["num_queries"] == num_queries and got["num_gallery"] == num_gallery
  assert got["mAP"] == pytest.approx(100 * metrics["mAP"], abs=1e-3)
  assert got["mINP"] == pytest.approx(100 * metrics["mINP"], abs=1e-3)
  assert got["rank1"] == pytest.approx(100 * metrics["cmc_unique"][0], abs=1e-3)


def test_on_a_trained_workdir(tiny_workdir, tmp_path, capsys):
  """The command on a trained workdir: files, settings, and one setting against the oracle computed
  from inference.load's own embeddings."""
  workdir, root = tiny_workdir["workdir"], tiny_workdir["root"]
  out = str(tmp_path / "report")
  assert tr.main(["--workdir", workdir, "--trials", "2", "--out", out]) == 0
  printed = capsys.readouterr().out
  assert T_IR in printed and "written to" in printed
  res = json.load(open(os.path.join(out, "text_retrieval.json")))
  md = open(os.path.join(out, "text_retrieval.md")).read()
  assert list(res["settings"]) == tr.setting_names(("all",))
  assert "Text-to-person retrieval on synthetic" in md and T_IR in md
  assert res["model"]["step"] == 2
  assert res["alignment"] == tr.text_alignment(tiny_workdir["config"])
  assert "Text alignment of this model: v was trained toward" in md
  _assert_matches_oracle(res["settings"][T_IR]["trials"][1],
                         _text_to_infrared_oracle(workdir, root, 1))
  # Clear one-line errors.
  assert tr.main(["--workdir", str(tmp_path / "none")]) == 2
  assert "error: workdir" in capsys.readouterr().err
  assert tr.main(["--workdir", workdir, "--root", str(tmp_path / "nowhere")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: SYSU-MM01 root") and err.count("\n") == 1


def test_the_training_report_has_the_text_rows(tiny_workdir):
  """The tiny run trains with eval.text_retrieval on: its report carries the text settings after
  the image rows, labelled, with numbers equal to the plain-loop oracle on inference.load's
  embeddings (the trainer takes l2(v) out of the test-time features, the oracle embeds it apart)."""
  workdir, root = tiny_workdir["workdir"], tiny_workdir["root"]
  assert tiny_workdir["config"].eval.text_retrieval
  res = json.load(open(os.path.join(workdir, "report", "results.json")))
  text = res["text_retrieval"]
  assert list(text["settings"]) == tr.setting_names(("all",))
  assert text["title"] == tr.SECTION_TITLE and text["query_source"] == tr.QUERY_SOURCE
  assert text["alignment"] == tr.text_alignment(tiny_workdir["config"])
  assert text["alignment"]["terms"] == ["ese", "cvsc", "cmsp"]
  assert [t["trial"] for t in text["settings"][T_IR]["trials"]] == [0]
  _assert_matches_oracle(text["settings"][T_IR]["trials"][0],
                         _text_to_infrared_oracle(workdir, root, 0))
  md = open(os.path.join(workdir, "report", "results.md")).read()
  image_part, text_part = md.split(f"\n## {tr.SECTION_TITLE}\n")
  assert "| all-search single-shot |" in image_part and T_IR not in image_part
  for name in tr.setting_names(("all",)):
    assert f"\n| {name} |" in text_part
  assert "Text alignment of this model: v was trained toward the text tower's description " \
         "features by ESE, CVSC, CMSP" in text_part


def test_text_alignment_says_what_ties_v_to_text():
  """Hand-written expectations for the ablation rows and the corner cases of the config."""
  from configs.common import ABLATION_ROWS
  from test_configs import parse

  def alignment(*args, row="full"):
    rows = [f"--config.{k}={v}" for k, v in ABLATION_ROWS[row].items()]
    return tr.text_alignment(parse("synthetic", *rows, *args))
  full = alignment()
  assert full["terms"] == ["ese", "cvsc", "cmsp"]
  assert full["text_tower"] == "pretrained (data/synthetic_clip), frozen"
  assert full["note"] == ("v was trained toward the text tower's description features by ESE, "
                          "CVSC, CMSP")
  assert alignment(row="ese")["terms"] == ["ese"]
  baseline = alignment(row="baseline")
  assert baseline["terms"] == []
  assert baseline["note"].startswith("no text term (baseline): v was trained by the identity and "
                                     "triplet losses only; its alignment with text is what the "
                                     "pretrained CLIP (data/synthetic_clip) gave")
  # Nothing relates v to text: from scratch, or a checkpoint that only fills the image tower.
  for args in (["--config.model.init.checkpoint="], ["--config.model.init.load=('vision',)"]):
    alone = alignment(*args, row="baseline")
    assert "the text rows measure chance" in alone["note"], args
  assert alignment("--config.model.init.load=('vision',)", row="baseline")["text_tower"] == \
      "random initialisation, frozen"
  trained = alignment("--config.model.init.checkpoint=", "--config.text.trainable=True",
                      row="baseline")
  assert trained["text_tower"] == "random initialisation, trained jointly"
  assert trained["note"].endswith("the text tower had no training signal (only weight decay "
                                  "moved it)")


def test_the_switch_is_checked_before_any_work(tiny_workdir, tmp_path):
  """eval.text_retrieval on a data set outside the SYSU-MM01 layout is a config error; test images
  without a description stop the run before training, naming the option."""
  from data_pipelines.records import DatasetError
  from eees_jax import config_validation, train
  from test_configs import parse
  config = parse("regdb", f"--config.dataset.root={tmp_path}", "--config.eval.text_retrieval=True")
  with pytest.raises(config_validation.ConfigError, match="eval.text_retrieval = True: False for "
                                                          "RegDB"):
    config_validation.validate(config)
  root = tiny_workdir["root"]
  records = sysu_mm01.test_records(root)
  lacking = next(r.path for r in records if r.modality == VISIBLE)
  lines = [l for l in open(os.path.join(root, "descriptions.jsonl"))
           if json.loads(l)["image"] != lacking]
  path = tmp_path / "fewer.jsonl"
  path.write_text("".join(lines))
  config = tiny_workdir["config"].copy_and_resolve_references()
  config.dataset.descriptions = str(path)
  with pytest.raises(DatasetError, match=r"(?s)config.eval.text_retrieval=True scores held-out "
                                         r"captions.*1 of .* images have no.*" + lacking):
    train.check_evaluation_inputs(config)
  config.eval.text_retrieval = False
  train.check_evaluation_inputs(config)
