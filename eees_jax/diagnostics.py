"""Does each EEES term do what SPEC section 3 says? Measurements on the synthetic test identities.

  python -m eees_jax.diagnostics --workdirs=workdir/ablation/ese/seed0,workdir/ablation/full/seed0 \
      [--split=test] [--out=diagnostics.md]

For each trained workdir (loaded with eees_jax.inference, so only the workdir and the data set's
folder are read), on the test (or val) identities of a synthetic set, whose captions and caption
truth (captions.jsonl) cover every image:

- CMSP targets the gap between cross- and intra-modality distances of the pair representations
  z_i = g(v^_i, t^_i) of one identity. Reported: mean d_inter - d_intra and the CMSP objective
  mean (d_inter - d_intra)^2 (SPEC 3.6, Euclidean, mean intra), over anchors whose identity has
  both modalities; the same gap for the image features v^ alone.
- CVSC targets single views that lack what other views of the person show. Reported: (a) the
  agreement of a single view with the multi-view teacher: mean KL(p^T_c || p^S_i) with
  p^T_c = softmax_d(<Zbar_c, Tbar_d> / T), p^S_i = softmax_d(<v^_i, Tbar_d> / T) over the
  identities of the split (SPEC 3.5), and the share of views whose p^S ranks their own identity
  first; (b) retrieval of attributes that a view's own caption OMITS: for each image and each
  attribute its caption does not state but the image shows, the probe sentences that differ only
  in that attribute's value are ranked by similarity to v^_i; accuracy of the true value, beside
  the same accuracy on attributes the caption does state.

- Which half of the test-time feature carries the retrieval: infrared -> visible Rank-1 and mAP of
  the whole feature and of its l2(BN f) blocks and its l2(v) blocks alone (`feature_blocks`), each
  with the mirrored image's block when the model uses flip. f pools the last map, v is CLIP's
  pooled output, and the two can differ widely (on the synthetic benchmark without
  pretrain.map_attribute_weight, f starts at chance).
- CMSP's gaps again on as many training identities (the identities the term was optimised on), so
  a term that closes its gap on training batches but not on new people shows as such.
- Fit or generalisation: Rank-1 and mAP of the test-time features for infrared -> visible,
  visible -> visible and infrared -> infrared queries (`modality_retrieval`), on the split's
  identities and on as many training identities. A model that separates people within a modality
  but not across, even on the identities it was trained on, has not learnt to bridge the
  modalities; one that does so on training identities only has not generalised.

Everything but the training-identity rows is computed on held-out identities; nothing here is used
for tuning.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import Sequence

import numpy as np
from absl import app, flags

from data_pipelines.records import INFRARED, VISIBLE

# Probe sentences: only the attribute's value varies. (slot, modalities it is probed in, values).
_PROBES = {
    "gender": ((VISIBLE, INFRARED), lambda p: {"man": "A man.", "woman": "A woman."}, "gender"),
    "hair": ((VISIBLE, INFRARED), lambda p: {v: f"A person with {w} hair." for v, w in
                                              (("short", "short"), ("medium", "shoulder-length"),
                                               ("long", "long"))}, "hair_length"),
    "shoes": ((VISIBLE, INFRARED), lambda p: {"sneakers": "A person wearing sneakers.",
                                              "boots": "A person wearing boots."}, "shoes"),
    "bag": ((VISIBLE, INFRARED), lambda p: {"backpack": "A person carrying a backpack.",
                                            "handbag": "A person carrying a handbag."}, "bag"),
    "headwear": ((VISIBLE, INFRARED), lambda p: {"cap": "A person wearing a cap.",
                                                 "beanie": "A person wearing a beanie."}, "headwear"),
    "upper": ((VISIBLE,), None, "upper_colour"),
    "lower": ((VISIBLE,), None, "lower_colour"),
}


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def _l2(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def modality_gap(z: np.ndarray, pids: np.ndarray, modality: np.ndarray) -> tuple[float, float]:
  """(mean d_inter - d_intra, mean (d_inter - d_intra)^2) over anchors with both kinds of partner.

  z: [n, d]; Euclidean distances; d_intra(i) = mean over j != i with the same identity and
  modality, d_inter(i) = mean over j with the same identity and the other modality.
  """
  d = np.sqrt(np.maximum(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1), 0.0))
  same = pids[:, None] == pids[None, :]
  same_mod = modality[:, None] == modality[None, :]
  intra = same & same_mod & ~np.eye(len(z), dtype=bool)
  inter = same & ~same_mod
  ok = intra.any(1) & inter.any(1)
  gap = (np.where(inter, d, 0).sum(1) / np.maximum(inter.sum(1), 1)
         - np.where(intra, d, 0).sum(1) / np.maximum(intra.sum(1), 1))[ok]
  return float(gap.mean()), float((gap ** 2).mean())


def modality_retrieval(features: np.ndarray, pids: np.ndarray, modality: np.ndarray,
                       camids: np.ndarray) -> dict[str, dict[str, float]]:
  """Rank-1 and mAP (%) by query and gallery modality: {"ir->vis" | "vis->vis" | "ir->ir": {...}}.

  features: [n, d] (cosine similarity); every image of the query modality is a query in turn,
  against every image of the target modality, under the LLCM rule of evaluation.metrics: images of
  the query's identity from the query's own camera are left out (the query itself, and in the
  same-modality rows its near-twins). Rank-1 is the first-match CMC; queries without a true match
  are skipped, and a row without any is NaN.
  """
  from eees_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  features = np.asarray(features, np.float32)
  out: dict[str, dict[str, float]] = {}
  for name, (q_mod, g_mod) in (("ir->vis", (INFRARED, VISIBLE)), ("vis->vis", (VISIBLE, VISIBLE)),
                               ("ir->ir", (INFRARED, INFRARED))):
    q, g = modality == q_mod, modality == g_mod
    match = ((pids[q][:, None] == pids[g][None, :])
             & (camids[q][:, None] != camids[g][None, :]))
    if not match.any():  # no query has a true match under the rule (or no query, no gallery)
      out[name] = {"rank1": float("nan"), "mAP": float("nan"), "queries": 0}
      continue
    res = metrics.evaluate_features(features[q], features[g], pids[q], pids[g], camids[q],
                                    camids[g], protocol="llcm")
    out[name] = {"rank1": 100 * float(res["cmc_standard"][0]), "mAP": 100 * float(res["mAP"]),
                 "queries": int(res["num_valid_queries"])}
  return out


def feature_blocks(features: np.ndarray, joint_dim: int, flip: bool) -> dict[str, np.ndarray]:
  """The test-time feature [n, D] and its f and v parts: {"f+v": [n, D], "f": [n, Df(*2)], "v": ...}.

  The layout is EEES.embed's: per view concat(l2(BN f) [Df], l2(v) [joint_dim]), the mirrored view's
  after the image's when `flip`. Each part keeps both views, so its cosine ranking is that of the
  sum of the per-view cosines, as for the whole feature.
  """
  features = np.asarray(features, np.float32)
  views = 2 if flip else 1
  per_view = features.shape[1] // views
  if per_view * views != features.shape[1] or not 0 < joint_dim < per_view:
    raise ValueError(f"a feature of {features.shape[1]} dims does not split into {views} view(s) "
                     f"of f and a {joint_dim}-d v")
  f_dim = per_view - joint_dim
  starts = [k * per_view for k in range(views)]
  f = np.concatenate([features[:, s:s + f_dim] for s in starts], axis=1)
  v = np.concatenate([features[:, s + f_dim:s + per_view] for s in starts], axis=1)
  return {"f+v": features, "f": f, "v": v}


def cmsp_measures(v: np.ndarray, t: np.ndarray, pids: np.ndarray, modality: np.ndarray) -> dict:
  """CMSP's pair gap and objective on z = l2(v + t) (the 'sum' pair), and the gap of v alone.

  v, t: [n, d] image and text features of the same n images.
  """
  pair_gap, pair_objective = modality_gap(_l2(v + t), pids, modality)
  return {"pair_gap": pair_gap, "pair_objective": pair_objective,
          "image_gap": modality_gap(v, pids, modality)[0]}


def teacher_agreement(v: np.ndarray, t: np.ndarray, pids: np.ndarray, temperature: float
                      ) -> tuple[float, float]:
  """(mean KL(teacher || student), share of views whose student ranks their identity first).

  v, t: unit image and caption features [n, d] of the same images; identities from `pids`.
  Teacher and student as CVSC (SPEC 3.5) with g = l2(a + b), over the identities present.
  """
  ids = np.unique(pids)
  vbar = _l2(np.stack([v[pids == c].mean(0) for c in ids]))
  tbar = _l2(np.stack([t[pids == c].mean(0) for c in ids]))
  zbar = _l2(vbar + tbar)
  teacher = _softmax(zbar @ tbar.T / temperature)            # [C, C]
  student = _softmax(v @ tbar.T / temperature)                # [n, C]
  row = np.searchsorted(ids, pids)
  p = teacher[row]
  kl = (p * (np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(student, 1e-12)))).sum(1)
  return float(kl.mean()), float(np.mean(np.argmax(student, 1) == row))


def attribute_retrieval(v: np.ndarray, records: Sequence, truths: dict, people: dict, embed_text
                        ) -> dict[str, dict[str, float]]:
  """Accuracy of reading each attribute from v^ by probe sentences: {"omitted"|"stated": {slot: acc}}.

  An (image, slot) pair counts as "omitted" when the image shows the slot but its caption does
  not state it, as "stated" when the caption states it.
  """
  from data_pipelines.synthetic.identities import LOWER_COLOURS, LOWER_NOUNS, UPPER_COLOURS, UPPER_NOUNS
  hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
  cache: dict[str, np.ndarray] = {}
  for i, r in enumerate(records):
    truth = truths[r.path]
    person = people[r.pid]
    for slot, (modalities, make, attr) in _PROBES.items():
      if r.modality not in modalities or slot not in truth["visible"]:
        continue
      if truth["visible"][slot] == "partial":
        continue
      if slot == "upper":
        noun = UPPER_NOUNS[(person["sleeve"], person["upper_material"])]
        options = {c: f"A person wearing a {c} {noun}." for c in UPPER_COLOURS}
      elif slot == "lower":
        noun = LOWER_NOUNS[(person["lower_type"], person["lower_material"])]
        options = {c: f"A person wearing {c} {noun}." for c in LOWER_COLOURS}
      else:
        options = make(person)
      value = person[attr]
      if value not in options:
        continue
      keys = list(options)
      missing = [options[k] for k in keys if options[k] not in cache]
      if missing:
        for s, e in zip(missing, embed_text(missing)):
          cache[s] = e
      scores = np.stack([cache[options[k]] for k in keys]) @ v[i]
      kind = "stated" if slot in truth["stated"] else "omitted"
      hits[(kind, slot)].append(keys[int(np.argmax(scores))] == value)
  out: dict[str, dict[str, float]] = {"omitted": {}, "stated": {}}
  for (kind, slot), h in sorted(hits.items()):
    out[kind][slot] = float(np.mean(h))
  for kind in out:
    all_hits = [x for (k, _), h in hits.items() if k == kind for x in h]
    out[kind]["all"] = float(np.mean(all_hits)) if all_hits else float("nan")
    out[kind]["count"] = len(all_hits)
  return out


def diagnose(workdir: str, root: str | None = None, split: str = "test", step: str = "latest") -> dict:
  """All diagnostics of one workdir on the `split` identities of its synthetic set."""
  from data_pipelines import sysu_mm01, synthetic
  from eees_jax import inference
  model = inference.load(workdir, step=step)
  cfg = model.config
  root = root or cfg.dataset.root
  truth_path = os.path.join(root, synthetic.CAPTION_TRUTH)
  if not os.path.isfile(truth_path):
    raise FileNotFoundError(f"{truth_path} not found: the diagnostics need a synthetic set written by "
                            "this generator (captions.jsonl)")
  truths = {json.loads(line)["image"]: json.loads(line) for line in open(truth_path, encoding="utf-8")}
  people = {p["pid"]: p for p in json.load(open(os.path.join(root, synthetic.MARKER)))["identities"]}
  records = sysu_mm01.test_records(root, split)
  features, v, t, pids, modality, camids = _encode(model, root, records)
  if cfg.loss.pair.kind != "sum":
    raise ValueError(f"diagnostics implement the pair representation 'sum' only; {workdir} used "
                     f"loss.pair.kind={cfg.loss.pair.kind!r}")
  kl, agree = teacher_agreement(v, t, pids, float(cfg.loss.cvsc.kd_temperature))
  train_records = sysu_mm01.training_records(root, len(set(pids.tolist())))
  (train_features, train_v, train_t, train_pids, train_modality,
   train_camids) = _encode(model, root, train_records)
  # CMSP's phenomenon where the term was optimised: a gap that closes here but not on the split's
  # identities is fitted, not learnt.
  cmsp_train = cmsp_measures(train_v, train_t, train_pids, train_modality)
  on_split = modality_retrieval(features, pids, modality, camids)
  halves = feature_blocks(features, model.joint_dim, model.flip)
  blocks = {"f+v": on_split["ir->vis"]}  # the whole feature's row, already ranked above
  blocks.update({name: modality_retrieval(halves[name], pids, modality, camids)["ir->vis"]
                 for name in ("f", "v")})
  return {"workdir": workdir, "step": model.step, "split": split, "images": len(records),
          "blocks": blocks,
          "retrieval": {split: on_split,
                        "train": modality_retrieval(train_features, train_pids, train_modality,
                                                    train_camids)},
          "cmsp": cmsp_measures(v, t, pids, modality),
          "cmsp_train": cmsp_train,
          "cvsc": {"teacher_kl": kl, "teacher_top1": agree,
                   "attributes": attribute_retrieval(v, records, truths, people, model.embed_text)}}


def _encode(model, root: str, records: Sequence) -> tuple[np.ndarray, ...]:
  """(test-time features [n, feature_dim], v [n, d], the embedded descriptions t [n, d], pids,
  modalities, cameras [n]) of `records`, in their order."""
  from data_pipelines import descriptions as descriptions_lib
  from data_pipelines import synthetic
  features = _embed(model, root, records)
  texts = descriptions_lib.load_descriptions(os.path.join(root, synthetic.DESCRIPTIONS), records)
  labels = (np.asarray([getattr(r, k) for r in records]) for k in ("pid", "modality", "camid"))
  return (features, model.joint_of(features), model.embed_text(texts), *labels)


def _embed(model, root: str, records: Sequence) -> np.ndarray:
  """Test-time features [n, feature_dim] of `records`, in their order."""
  modality = np.asarray([r.modality for r in records])
  feats = np.zeros((len(records), model.feature_dim), np.float32)
  for m in (VISIBLE, INFRARED):
    rows = np.flatnonzero(modality == m)
    if len(rows):
      feats[rows] = model.embed_images([os.path.join(root, records[i].path) for i in rows], m)
  return feats


def markdown(results: Sequence[dict]) -> str:
  lines = ["| run | CMSP: pair gap d_inter - d_intra | CMSP objective | image-feature gap | "
           "CVSC: KL(teacher || view) | view ranks own identity first | omitted attributes read | "
           "stated attributes read |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    a = r["cvsc"]["attributes"]
    lines.append(f"| {r['workdir']} | {r['cmsp']['pair_gap']:.4f} | {r['cmsp']['pair_objective']:.5f} | "
                 f"{r['cmsp']['image_gap']:.4f} | {r['cvsc']['teacher_kl']:.4f} | "
                 f"{100 * r['cvsc']['teacher_top1']:.1f}% | "
                 f"{100 * a['omitted']['all']:.1f}% (n={a['omitted']['count']}) | "
                 f"{100 * a['stated']['all']:.1f}% (n={a['stated']['count']}) |")
  lines += ["", "CMSP's phenomenon on as many training identities, where the term was optimised (against "
            "the first table's split identities: fitted or learnt):", "",
            "| run | pair gap d_inter - d_intra, train ids | CMSP objective, train ids | "
            "image-feature gap, train ids |", "|---|---|---|---|"]
  for r in results:
    if "cmsp_train" in r:
      c = r["cmsp_train"]
      lines.append(f"| {r['workdir']} | {c['pair_gap']:.4f} | {c['pair_objective']:.5f} | "
                   f"{c['image_gap']:.4f} |")
  lines += ["", "Infrared -> visible Rank-1 / mAP on the split's identities of the test-time feature and "
            "of its two halves alone:", "", "| run | f + v (test-time feature) | l2(BN f) | l2(v) |",
            "|---|---|---|---|"]
  for r in results:
    if "blocks" in r:
      cells = " | ".join(f"{r['blocks'][k]['rank1']:.1f} / {r['blocks'][k]['mAP']:.1f}"
                         for k in ("f+v", "f", "v"))
      lines.append(f"| {r['workdir']} | {cells} |")
  lines += ["", "Rank-1 / mAP of the test-time features by modality, on the split's identities and on "
            "as many training identities (fit or generalisation):", "",
            "| run | identities | infrared → visible | visible → visible | infrared → infrared |",
            "|---|---|---|---|---|"]
  for r in results:
    for which, rows in r.get("retrieval", {}).items():
      cells = " | ".join(f"{rows[k]['rank1']:.1f} / {rows[k]['mAP']:.1f}"
                         for k in ("ir->vis", "vis->vis", "ir->ir"))
      lines.append(f"| {r['workdir']} | {which} | {cells} |")
  return "\n".join(lines) + "\n"


_WORKDIRS = flags.DEFINE_list("workdirs", None, "Trained workdirs to diagnose.")
_ROOT = flags.DEFINE_string("root", None, "Synthetic set folder (default: each run's dataset.root).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "Identities to measure on.")
_OUT = flags.DEFINE_string("out", None, "Also write the table (markdown) and JSON beside it here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIRS.value:
    raise app.UsageError("--workdirs is required")
  results = [diagnose(w, _ROOT.value, _SPLIT.value) for w in _WORKDIRS.value]
  md = markdown(results)
  print(md)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(md)
    with open(os.path.splitext(_OUT.value)[0] + ".json", "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
