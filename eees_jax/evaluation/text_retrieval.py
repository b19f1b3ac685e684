"""Text-to-person retrieval on a SYSU-MM01-layout test set whose images have descriptions.

  python -m eees_jax.evaluation.text_retrieval --workdir W [--step latest|best|N] [--trials 10] \\
      [--split test|val] [--modes all,indoor] [--text-weight 0.5] [--root DIR]

writes <workdir>/report/text_retrieval.json and .md (the results structure of
eees_jax.evaluation.protocols, so eees_jax.evaluation.report renders the settings as extra rows).

The protocol (every choice the EEES paper leaves open, fixed here):
- Features: sentences through the model's text tower (unit text features); images by l2(v), the
  image side of CLIP's joint space that ESE aligns with text. Cosine distance.
- Text queries are held-out captions: the description of one of the identity's VISIBLE test images
  (test identities are never seen in training, so neither are their captions). In trial t, the
  queries of a setting are the captions of every visible test image that is NOT in that trial's
  visible gallery (so a text query's own image is never in the gallery it searches); an identity
  whose visible images are all drawn into the gallery has no text query in that trial.
- A text query has no camera: the SYSU camera rule (a camera-3 query ignores camera-2 gallery
  images) never removes anything for it.
- Galleries: visible, the AGW single-shot draw of trial t (data_pipelines.sysu_mm01.select_gallery,
  as the image evaluation draws it, per search mode); infrared, every infrared test image (the
  image protocol's query list; text -> infrared takes the queries of the all-search draw).
- Fusion (infrared image + text -> visible, the setting of TVI-LFM and Refer-VI-ReID): each infrared
  query image of the image protocol with a held-out caption of its identity (the identity's
  held-out visible images of the trial sorted by path, the j-th infrared image of the identity
  taking caption j mod their number); query = embedding.fuse_joint(l2(v) of the infrared image,
  the text feature, text_weight) (w = 0.5: the normalised sum). These queries keep their camera,
  so the camera rule applies. The same queries without text (l2(v) of the infrared image alone)
  are scored as the reference row that shows what the sentence adds.
- Rank-1/5/10/20 (unique-identity CMC, as SYSU-MM01), mAP and mINP by eees_jax.evaluation.metrics
  (identity-level matching), per trial, and the mean over trials.

The trainer scores the same settings in its final evaluation when config.eval.text_retrieval is on
and puts them into the run's report as extra rows (results["text_retrieval"]). Every EEES model
has a joint feature v and a text tower, so the rows can be computed for any run; `text_alignment`
says what they mean for a run's config: whether a training term (ESE, CVSC, CMSP) pulled v toward
the text features, or (the baseline) only a pretrained CLIP initialisation relates them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Mapping, Sequence

import numpy as np

from data_pipelines import sysu_mm01
from data_pipelines.records import VISIBLE, DatasetError, ImageRecord
from eees_jax import embedding
from eees_jax.evaluation import metrics, protocols

JointExtract = Callable[[Sequence[ImageRecord]], np.ndarray]   # records -> l2(v) [n, D]
EmbedText = Callable[[Sequence[str]], np.ndarray]              # sentences -> unit [n, D]
TEXT_CAMERA = 0            # a text query's camera: none (the SYSU rule acts on camera 3 only)
QUERY_SOURCE = "held-out visible captions"
_NAMES = {
    "text_ir": f"text -> infrared ({QUERY_SOURCE})",
    "text_vis": "text -> visible, {mode}-search (" + QUERY_SOURCE + ")",
    "fusion": "infrared + text -> visible, {mode}-search (" + QUERY_SOURCE + ")",
    "image": "infrared -> visible, {mode}-search (l2(v) alone, reference for the fusion)",
}
_NOTES = {
    "text_ir": "Text queries: captions of the visible test images outside trial t's all-search "
               "visible gallery; gallery: every infrared test image.",
    "text_vis": "Text queries: captions of the visible test images outside trial t's visible "
                "gallery; gallery: that single-shot draw.",
    "fusion": "Query: l2((1 - w) l2(v_infrared) + w t) with a held-out caption of the identity; "
              "camera rule of the infrared image applies.",
    "image": "The fusion's infrared queries without their text, in the same joint space.",
}


TEXT_TERMS = ("ese", "cvsc", "cmsp")   # the loss terms that pull v toward description features
SECTION_TITLE = "Text-to-person retrieval (extra rows, not part of the image protocol)"


def text_alignment(config: Mapping) -> dict:
  """What ties the image joint feature v to the text tower in a run of `config` (an experiment
  config, ConfigDict or its JSON dict): {"terms": enabled text terms, "text_tower": where its
  weights come from, "note": one sentence for the report}.

  Without a text term (the baseline) v is trained by the identity and triplet losses alone: the
  rows are still computed, and only a pretrained image + text checkpoint makes them more than
  chance."""
  loss, init = config["loss"], config["model"]["init"]
  terms = [t for t in TEXT_TERMS if loss[t]["enabled"]]
  checkpoint = str(init["checkpoint"] or "")
  load = set(init["load"]) if checkpoint else set()
  trainable = bool(config["text"]["trainable"])
  origin = f"pretrained ({checkpoint})" if "text" in load else "random initialisation"
  tower = f"{origin}, {'trained jointly' if trainable else 'frozen'}"
  if terms:
    note = (f"v was trained toward the text tower's description features by "
            f"{', '.join(t.upper() for t in terms)}")
  elif {"vision", "text"} <= load:
    note = (f"no text term (baseline): v was trained by the identity and triplet losses only; its "
            f"alignment with text is what the pretrained CLIP ({checkpoint}) gave and training kept")
  else:
    note = ("no text term and no pretrained image + text towers: nothing relates v to the text "
            "tower, so the text rows measure chance (n/a as a text-search result)")
  if trainable and not terms:
    note += "; the text tower had no training signal (only weight decay moved it)"
  return {"terms": terms, "text_tower": tower, "note": note}


def report_notes(results: dict, model: str = "") -> str:
  """The paragraph under the text rows of a report: where queries and galleries come from, the
  fusion, and (when the results carry it) the run's text alignment."""
  lines = [
      (f"{model} " if model else "")
      + f"Text queries are {results['query_source']}: the caption of one of the identity's visible "
      "test images that is not in the trial's visible gallery (test identities, and so their "
      "captions, are never seen in training); a text query has no camera. Galleries: every "
      "infrared test image (text -> infrared); the trial's single-shot visible draw of the image "
      "protocol (text -> visible, fusion). Fusion: an infrared query image with a held-out caption "
      f"of its identity, l2((1 - w) l2(v) + w t) with w = {results['text_weight']}; the infrared-only "
      "row is its reference. Features: l2(v) and unit text features, cosine distance. Protocol: "
      "eees_jax/evaluation/text_retrieval.py."]
  alignment = results.get("alignment")
  if alignment:
    lines.append(f"Text alignment of this model: {alignment['note']}. Text tower: "
                 f"{alignment['text_tower']}.")
  return " ".join(lines)


def report_section(results: dict, config: Mapping, extra_note: str = "") -> dict:
  """`results` of evaluate_text_retrieval labelled as the extra rows of a run's report
  (results["text_retrieval"] of the image protocol's results): adds the run's text alignment, the
  section title and its notes."""
  section = dict(results, alignment=text_alignment(config), title=SECTION_TITLE)
  section["notes"] = report_notes(section) + (f" {extra_note}" if extra_note else "")
  return section


def setting_names(modes: Sequence[str] = ("all",)) -> list[str]:
  """The settings `evaluate_text_retrieval` reports for `modes`, in order."""
  names = [_NAMES["text_ir"]]
  names += [_NAMES["text_vis"].format(mode=m) for m in modes]
  for m in modes:
    names += [_NAMES["fusion"].format(mode=m), _NAMES["image"].format(mode=m)]
  return names


def _score(q_feats, q_pids, q_cams, g_records, g_feats, max_rank, chunk_size) -> dict:
  res = metrics.evaluate_features(
      q_feats, g_feats, np.asarray(q_pids, np.int64),
      np.fromiter((r.pid for r in g_records), np.int64, len(g_records)), np.asarray(q_cams, np.int64),
      np.fromiter((r.camid for r in g_records), np.int64, len(g_records)), protocol="sysu",
      max_rank=max_rank, metric="cosine", chunk_size=chunk_size)
  return protocols.summarize(res)


def held_out_visible(records: Sequence[ImageRecord], gallery: Sequence[ImageRecord]
                     ) -> list[ImageRecord]:
  """The visible test records not in `gallery`, in record order: whose captions are the queries."""
  drawn = {r.path for r in gallery}
  return [r for r in records if r.modality == VISIBLE and r.path not in drawn]


def fusion_pairs(queries: Sequence[ImageRecord], held_out: Sequence[ImageRecord]
                 ) -> list[tuple[ImageRecord, ImageRecord]]:
  """(infrared query, visible record whose caption goes with it): the j-th infrared query of an
  identity takes the (j mod n)-th of its n held-out visible records sorted by path; identities
  without held-out visible records are left out."""
  by_pid: dict[int, list[ImageRecord]] = {}
  for r in sorted(held_out, key=lambda r: r.path):
    by_pid.setdefault(r.pid, []).append(r)
  seen: dict[int, int] = {}
  pairs = []
  for q in queries:
    options = by_pid.get(q.pid)
    if options:
      j = seen.get(q.pid, 0)
      seen[q.pid] = j + 1
      pairs.append((q, options[j % len(options)]))
  return pairs


def evaluate_text_retrieval(joint_extract: JointExtract, embed_text: EmbedText,
                            records: Sequence[ImageRecord], captions: Mapping[str, str],
                            modes: Sequence[str] = ("all",), trials: int | Sequence[int] = 10,
                            max_rank: int = 20, text_weight: float = 0.5,
                            dataset: str = "SYSU-MM01", chunk_size: int | None = None) -> dict:
  """Scores the settings of `setting_names(modes)` (module docstring) and returns the results dict
  of eees_jax.evaluation.protocols (percentages; "query" is "text", "infrared + text" or
  "infrared").

  joint_extract(records) -> l2(v) float32 [n, D]; embed_text(sentences) -> unit [n, D].
  records: every test image (sysu_mm01.test_records: all six cameras, pid = original id).
  captions: image path -> its description, for every visible test image.
  """
  trial_ids = list(range(trials)) if isinstance(trials, int) else [int(t) for t in trials]
  if not trial_ids:
    raise ValueError("no trials to evaluate: pass trials >= 1 (10 in the protocol)")
  if not 0.0 <= text_weight <= 1.0:
    raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
  for mode in modes:
    if mode not in sysu_mm01.GALLERY_CAMERAS:
      raise ValueError(f"search mode must be one of {sorted(sysu_mm01.GALLERY_CAMERAS)}, got {mode!r}")
  records = list(records)
  visible = [r for r in records if r.modality == VISIBLE]
  missing = [r.path for r in visible if not (captions.get(r.path) or "").strip()]
  if missing:
    raise ValueError(f"{len(missing)} of {len(visible)} visible test images have no description "
                     f"(first: {missing[:5]}); text retrieval needs a caption of every visible test "
                     "image")
  ir_queries = sysu_mm01.select_query(records)
  if not ir_queries or not visible:
    raise ValueError("the test set needs infrared (cameras 3, 6) and visible images")
  galleries = {(m, t): sysu_mm01.select_gallery(records, m, t) for m in modes for t in trial_ids}
  if "all" not in modes:
    galleries.update({("all", t): sysu_mm01.select_gallery(records, "all", t) for t in trial_ids})
  bank = protocols.FeatureBank(joint_extract, ir_queries + visible, "test")
  texts = sorted({captions[r.path] for r in visible})
  text_feats = np.asarray(embed_text(texts), np.float32)
  if text_feats.shape[0] != len(texts):
    raise ValueError(f"embed_text returned {text_feats.shape[0]} rows for {len(texts)} sentences")
  text_row = {t: i for i, t in enumerate(texts)}

  def text_of(recs):
    return text_feats[[text_row[captions[r.path]] for r in recs]]

  settings: dict[str, dict] = {}

  def add(key, mode, query, gallery, trial, result):
    name = _NAMES[key].format(mode=mode)
    s = settings.setdefault(name, {"query": query, "gallery": gallery,
                                   "cmc_kind": "unique-identity", "reranked": False,
                                   "note": _NOTES[key], "trials": []})
    s["trials"].append({"trial": trial, **result})

  for t in trial_ids:
    held = held_out_visible(records, galleries[("all", t)])
    if not held:
      raise DatasetError(
          "text retrieval has no query: its queries are captions of visible test images outside "
          "the single-shot gallery, and every visible test image is in it (one image per identity "
          "and camera, e.g. a synthetic set generated with images_per_camera=1); use a test set "
          "with more visible images per identity, or set --config.eval.text_retrieval=False")
    add("text_ir", "all", "text", "infrared", t,
        _score(text_of(held), [r.pid for r in held], [TEXT_CAMERA] * len(held), ir_queries,
               bank.take(ir_queries), max_rank, chunk_size))
  for mode in modes:
    for t in trial_ids:
      gallery = galleries[(mode, t)]
      g_feats = bank.take(gallery)
      held = held_out_visible(records, gallery)
      add("text_vis", mode, "text", "visible", t,
          _score(text_of(held), [r.pid for r in held], [TEXT_CAMERA] * len(held), gallery,
                 g_feats, max_rank, chunk_size))
      pairs = fusion_pairs(ir_queries, held)
      q_records = [q for q, _ in pairs]
      image = bank.take(q_records)
      fused = embedding.fuse_joint(image, text_of([v for _, v in pairs]), text_weight)
      pids, cams = [q.pid for q in q_records], [q.camid for q in q_records]
      add("fusion", mode, "infrared + text", "visible", t,
          _score(fused, pids, cams, gallery, g_feats, max_rank, chunk_size))
      add("image", mode, "infrared", "visible", t,
          _score(image, pids, cams, gallery, g_feats, max_rank, chunk_size))
  ordered = {name: settings[name] for name in setting_names(modes)}
  for s in ordered.values():
    s["mean"] = protocols.mean_of_trials(s["trials"])
  return {"dataset": dataset, "protocol": "sysu", "distance": "cosine", "max_rank": max_rank,
          "trial_key": "trial", "query_source": QUERY_SOURCE, "text_camera": "none",
          "text_weight": text_weight, "settings": ordered}


# ----------------------------------------------------------------------------------------------
# Command line: a trained workdir on its own data set.
# ----------------------------------------------------------------------------------------------

_SYSU_LAYOUT = ("sysu", "synthetic")


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def run(workdir: str, step: str | int = "latest", trials: int = 10, split: str = "test",
        modes: Sequence[str] = ("all",), text_weight: float = 0.5, root: str | None = None,
        out_dir: str | None = None) -> dict:
  """Loads the model of `workdir`, scores it on its data set and writes text_retrieval.{json,md}
  into `out_dir` (default <workdir>/report); returns the results."""
  # pylint: disable=g-import-not-at-top (the model and description reader: only for the CLI)
  from data_pipelines import descriptions as descriptions_lib
  from eees_jax import inference
  from eees_jax.evaluation import report
  model = inference.load(workdir, step)
  dataset = model.config.get("dataset", {})
  name = dataset.get("name", "")
  if name not in _SYSU_LAYOUT:
    raise ValueError(f"text retrieval needs a SYSU-MM01-layout data set ({', '.join(_SYSU_LAYOUT)});"
                     f" the model of {workdir} was trained on {name!r}")
  root = root or dataset.get("root", "")
  path = dataset.get("descriptions") or ""
  if not path:
    raise ValueError(f"the config of {workdir} names no descriptions file (config.dataset."
                     "descriptions)")
  path = path if os.path.isabs(path) else os.path.join(root, path)
  records = sysu_mm01.test_records(root, split)
  visible = [r for r in records if r.modality == VISIBLE]
  texts = descriptions_lib.load_descriptions(path, visible,
                                             field=dataset.get("description_field", "auto"))

  def joint_extract(recs):
    return model.embed_joint([os.path.join(root, r.path) for r in recs],
                             [r.modality for r in recs])

  title = "SYSU-MM01" if name == "sysu" else "synthetic (SYSU-MM01 layout)"
  results = evaluate_text_retrieval(joint_extract, model.embed_text, records,
                                    {r.path: t for r, t in zip(visible, texts)}, modes=modes,
                                    trials=trials, text_weight=text_weight, dataset=title)
  results["model"] = {"workdir": os.path.abspath(workdir), "step": int(model.step),
                      "model_id": model.model_id, "split": split}
  results["alignment"] = text_alignment(model.config)
  out_dir = out_dir or os.path.join(workdir, "report")
  os.makedirs(out_dir, exist_ok=True)
  held = " (held-out val ids, not a test result)" if split == "val" else ""
  notes = report_notes(results, f"Model: {workdir} step {model.step} ({model.model_id}).")
  markdown = report.results_markdown(results, f"Text-to-person retrieval on {title}{held}", notes)
  _write_atomic(os.path.join(out_dir, "text_retrieval.json"), json.dumps(results, indent=1))
  _write_atomic(os.path.join(out_dir, "text_retrieval.md"), markdown)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  parser = argparse.ArgumentParser(prog="python -m eees_jax.evaluation.text_retrieval",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="trained model's workdir")
  parser.add_argument("--step", type=lambda v: int(v) if v.isdigit() else v, default="latest", help="latest, best or a step number")
  parser.add_argument("--trials", type=int, default=10, help="gallery draws (10 in the protocol)")
  parser.add_argument("--split", default="test", choices=sysu_mm01.EVAL_SPLITS,
                      help="test ids, or val ids (held-out training ids, for tuning)")
  parser.add_argument("--modes", default="all", help="comma-separated search modes: all, indoor")
  parser.add_argument("--text-weight", type=float, default=0.5, help="fusion weight of the text")
  parser.add_argument("--root", default=None, help="data set folder (default: the run's config)")
  parser.add_argument("--out", default=None, help="report folder (default: <workdir>/report)")
  args = parser.parse_args(argv)
  try:
    results = run(args.workdir, args.step, args.trials, args.split,
                  tuple(m for m in args.modes.split(",") if m), args.text_weight, args.root,
                  args.out)
  except (ValueError, OSError) as e:  # WorkdirError, DatasetError, bad options, missing files
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.workdir, "report")
  print(f"{'setting':<78} {'Rank-1':>7} {'mAP':>7} {'mINP':>7}")
  for name, s in results["settings"].items():
    m = s["mean"]
    print(f"{name:<78} {m['rank1']:7.2f} {m['mAP']:7.2f} {m['mINP']:7.2f}")
  print(f"written to {os.path.join(out, 'text_retrieval.md')} and .json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
