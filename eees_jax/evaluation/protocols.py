"""The test protocols of SYSU-MM01, RegDB and LLCM, on features from any model.

The caller passes `extract(records) -> float32 [n, d]`: one feature row per ImageRecord, raw or
L2-normalised (each record carries its modality, so the extractor picks the right stem). A runner
lists the protocol's images through data_pipelines (from the data set folder, or from test records
the caller passes, e.g. those of prepared TFDS splits), extracts every distinct image exactly once,
ranks with cosine distance (1 - cosine similarity, smaller is closer) and scores each trial with
`metrics.evaluate_features`.

Results (the structure `report.write_report` consumes), percentages in [0, 100]:

  {"dataset": "SYSU-MM01", "protocol": "sysu", "distance": "cosine", "max_rank": 20,
   "trial_key": "trial",                     # "split" for RegDB
   "settings": {                             # insertion-ordered
     "all-search single-shot": {
       "query": "infrared", "gallery": "visible", "cmc_kind": "unique-identity",
       "reranked": False,
       "note": "...",                        # only where the ranking is not plain query -> gallery
       "trials": [{"trial": 0, "rank1": .., "rank5": .., "rank10": .., "rank20": .., "mAP": ..,
                   "mINP": .., "cmc": [max_rank], "cmc_standard": [max_rank],
                   "num_queries": .., "num_gallery": .., "num_valid_queries": ..}, ...],
       "mean": {"rank1": .., ..., "cmc": [...], "cmc_standard": [...]}},
     ...}}

"cmc" is the curve the protocol reports (AGW/DEEN: the unique-identity CMC for SYSU-MM01 and LLCM,
the standard CMC for RegDB); rank-k values are read from it. With `rerank` set, every setting gets
a twin "<name> (re-ranked)" with "reranked": True, scored on k-reciprocal re-ranked distances.
LLCM results also carry "layout" ("deen" or "query_gallery", see `evaluate_llcm`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from data_pipelines.records import MODALITY_NAMES, ImageRecord
from eees_jax.evaluation import metrics

Extract = Callable[[Sequence[ImageRecord]], np.ndarray]
RANKS = (1, 5, 10, 20)
SYSU_MODES = ("all", "indoor")
REGDB_DIRECTIONS = ("visible_to_thermal", "thermal_to_visible")
LLCM_DIRECTIONS = ("infrared_to_visible", "visible_to_infrared")
LLCM_LAYOUTS = ("deen", "query_gallery")
RERANKED_SUFFIX = " (re-ranked)"
DEEN_TRANSPOSED_NOTE = (
    "DEEN layout: as DEEN's test.py, this direction ranks the transposed matrix, so each drawn "
    "infrared image (one per identity and camera, per trial) ranks all visible test images; these "
    "are the numbers DEEN publishes as visible to infrared. --config.eval.llcm_layout=query_gallery "
    "ranks the drawn infrared gallery for every visible query instead.")
_METRIC_KEYS = tuple(f"rank{k}" for k in RANKS) + ("mAP", "mINP")


class FeatureBank:
  """Features of a set of images, extracted once (one `extract` call), looked up by path."""

  def __init__(self, extract: Extract, records: Iterable[ImageRecord], what: str):
    unique: dict[str, ImageRecord] = {}
    for r in records:
      unique.setdefault(r.path, r)
    self.records = list(unique.values())
    if not self.records:
      raise ValueError(f"no {what} images to extract features from")
    feats = np.asarray(extract(self.records))
    if feats.ndim != 2 or feats.shape[0] != len(self.records):
      raise ValueError(f"extract returned shape {feats.shape} for {len(self.records)} {what} images; "
                       "expected one feature row per record, [n, d]")
    if not np.all(np.isfinite(feats)):
      raise ValueError(f"extract returned non-finite {what} features")
    self.features = feats.astype(np.float32, copy=False)
    self._row = {r.path: i for i, r in enumerate(self.records)}

  def rows(self, records: Sequence[ImageRecord]) -> np.ndarray:
    """Row indices [len(records)] of `records` (by path)."""
    try:
      return np.fromiter((self._row[r.path] for r in records), np.int64, len(records))
    except KeyError as e:
      raise KeyError(f"{e.args[0]} was not among the extracted images") from None

  def take(self, records: Sequence[ImageRecord]) -> np.ndarray:
    """Features [len(records), d] of `records`."""
    return self.features[self.rows(records)]


def _labels(records: Sequence[ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
  return (np.fromiter((r.pid for r in records), np.int64, len(records)),
          np.fromiter((r.camid for r in records), np.int64, len(records)))


def summarize(res: dict) -> dict:
  """Percentages of one `metrics.evaluate` result: rank-1/5/10/20, mAP, mINP and the curves.

  Rank k beyond a gallery smaller than k reads the last CMC entry (every query is matched by then).
  """
  cmc = 100.0 * np.asarray(res["cmc"])
  out = {f"rank{k}": float(cmc[min(k, len(cmc)) - 1]) for k in RANKS}
  out.update({
      "mAP": 100.0 * res["mAP"], "mINP": 100.0 * res["mINP"],
      "cmc": cmc.tolist(), "cmc_standard": (100.0 * np.asarray(res["cmc_standard"])).tolist(),
      "num_queries": res["num_queries"], "num_gallery": res["num_gallery"],
      "num_valid_queries": res["num_valid_queries"]})
  return out


def _mean_curve(curves: list[list[float]]) -> list[float]:
  n = max(len(c) for c in curves)
  return np.mean([c + [c[-1]] * (n - len(c)) for c in curves], axis=0).tolist()


def mean_of_trials(trials: list[dict]) -> dict:
  """Mean over trials of the metrics and CMC curves (curves padded with their last value)."""
  out = {k: float(np.mean([t[k] for t in trials])) for k in _METRIC_KEYS}
  out["cmc"] = _mean_curve([t["cmc"] for t in trials])
  out["cmc_standard"] = _mean_curve([t["cmc_standard"] for t in trials])
  return out


class _Collector:
  """Accumulates per-trial results into the settings of a results dict."""

  def __init__(self, dataset: str, protocol: str, max_rank: int, trial_key: str, rerank,
               total: int, progress: bool):
    self.results = {"dataset": dataset, "protocol": protocol, "distance": "cosine",
                    "max_rank": max_rank, "trial_key": trial_key, "settings": {}}
    self.protocol, self.max_rank, self.trial_key, self.rerank = protocol, max_rank, trial_key, rerank
    self._bar = tqdm(total=total, desc="evaluation: scoring", unit="trial", leave=False,
                     disable=not progress, dynamic_ncols=True)

  def _setting(self, name: str, query: str, gallery: str, reranked: bool,
               note: str | None) -> dict:
    key = name + RERANKED_SUFFIX if reranked else name
    setting = {"query": query, "gallery": gallery, "reranked": reranked, "trials": [],
               "cmc_kind": "standard" if self.protocol == "regdb" else "unique-identity"}
    if note:
      setting["note"] = note
    return self.results["settings"].setdefault(key, setting)

  def add(self, name: str, trial: int, q_feats, q_records, g_feats, g_records,
          chunk_size: int | None, note: str | None = None) -> None:
    """Scores one trial of setting `name` (and its re-ranked twin when re-ranking is on).

    note: how the setting's ranking differs from plain query -> gallery (goes into the report).
    """
    q_pids, q_cams = _labels(q_records)
    g_pids, g_cams = _labels(g_records)
    query = MODALITY_NAMES[q_records[0].modality]
    gallery = MODALITY_NAMES[g_records[0].modality]
    res = metrics.evaluate_features(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams,
                                    protocol=self.protocol, max_rank=self.max_rank,
                                    metric="cosine", chunk_size=chunk_size)
    self._setting(name, query, gallery, False, note)["trials"].append(
        {self.trial_key: trial, **summarize(res)})
    if self.rerank is not None:
      from eees_jax.evaluation import reranking
      dist = reranking.k_reciprocal_rerank(q_feats, g_feats, **self.rerank)
      res = metrics.evaluate(dist, q_pids, g_pids, q_cams, g_cams, protocol=self.protocol,
                             max_rank=self.max_rank, chunk_size=chunk_size)
      self._setting(name, query, gallery, True, note)["trials"].append(
          {self.trial_key: trial, **summarize(res)})
    self._bar.update(1)

  def finish(self) -> dict:
    self._bar.close()
    for setting in self.results["settings"].values():
      setting["mean"] = mean_of_trials(setting["trials"])
    return self.results


def _trial_list(trials: int | Sequence[int]) -> list[int]:
  out = list(range(trials)) if isinstance(trials, int) else [int(t) for t in trials]
  if not out:
    raise ValueError("no trials to evaluate: pass trials >= 1 (10 in the protocols)")
  return out


def _check_rerank(rerank: dict | None) -> dict | None:
  if rerank is None:
    return None
  allowed = {"k1", "k2", "lambda_value"}
  unknown = set(rerank) - allowed
  if unknown:
    raise ValueError(f"unknown re-ranking option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
  return dict(rerank)


def sysu_setting_name(mode: str, shots: int) -> str:
  """"all-search single-shot", "indoor-search multi-shot" (10 shots), or "<n>-shot"."""
  shot = "single-shot" if shots == 1 else "multi-shot" if shots == 10 else f"{shots}-shot"
  return f"{mode}-search {shot}"


def direction_setting_name(direction: str) -> str:
  """"visible to thermal" for RegDB's / LLCM's direction "visible_to_thermal"."""
  return direction.replace("_", " ")


def setting_names(names: Sequence[str], reranked: bool) -> list[str]:
  """The settings a runner reports for `names`, in order: each followed by its re-ranked twin."""
  return [n for name in names for n in ((name, name + RERANKED_SUFFIX) if reranked else (name,))]


def evaluate_sysu(extract: Extract, root: str, modes: Sequence[str] = SYSU_MODES,
                  shots: Sequence[int] = (1,), trials: int | Sequence[int] = 10,
                  max_rank: int = 20, gallery_source: str = "random",
                  chunk_size: int | None = None, rerank: dict | None = None,
                  split: str = "test", records: Sequence[ImageRecord] | None = None,
                  progress: bool = False) -> dict:
  """SYSU-MM01: infrared queries (cameras 3, 6) against per-trial visible galleries.

  For each mode ("all": cameras 1, 2, 4, 5; "indoor": 1, 2) and shots (1 single-shot, 10
  multi-shot), `trials` draws of data_pipelines.sysu_mm01.gallery_set (the AGW draw; or the official
  rand_perm_cam.mat with gallery_source="official"). Query features are extracted once, gallery
  features once for the union of all draws; each trial selects its rows by path. Scored with the
  AGW eval_sysu rules (camera-3 queries ignore camera 2; unique-identity CMC).
  rerank: None, or k-reciprocal options {"k1", "k2", "lambda_value"} (adds re-ranked settings).
  split: "test" (the protocol), or "val" to score held-out training identities while tuning.
  records: the split's test records (sysu_mm01.test_records, or the prepared TFDS test splits);
    None lists them from `root`. The official gallery is always read from `root`.
  progress: a tqdm bar over the scored trials (every runner takes it).
  """
  from data_pipelines import sysu_mm01
  trial_ids = _trial_list(trials)
  for mode in modes:
    if mode not in SYSU_MODES:
      raise ValueError(f"SYSU-MM01 mode must be one of {SYSU_MODES}, got {mode!r}")
  for s in shots:
    if int(s) < 1:
      raise ValueError(f"shots must be >= 1, got {s}")
  if gallery_source not in sysu_mm01.GALLERY_SOURCES:
    raise ValueError(f"gallery source must be one of {sysu_mm01.GALLERY_SOURCES}, "
                     f"got {gallery_source!r}")
  test = list(records) if records is not None else sysu_mm01.test_records(root, split)
  queries = {mode: sysu_mm01.select_query(test) for mode in modes}

  def gallery(mode, s, t):
    if gallery_source == "random":
      return sysu_mm01.select_gallery(test, mode, t, shots=s)
    return sysu_mm01.gallery_set(root, mode, t, shots=s, source=gallery_source, split=split)

  galleries = {(mode, s, t): gallery(mode, s, t) for mode in modes for s in shots for t in trial_ids}
  for what, lists in (("query", queries), ("gallery", galleries)):
    for key, recs in lists.items():
      if not recs:
        raise ValueError(f"SYSU-MM01 {what} list {key} under {root} is empty")
  q_bank = FeatureBank(extract, (r for recs in queries.values() for r in recs), "query")
  g_bank = FeatureBank(extract, (r for recs in galleries.values() for r in recs), "gallery")

  out = _Collector("SYSU-MM01", "sysu", max_rank, "trial", _check_rerank(rerank),
                   len(galleries), progress)
  for mode in modes:
    q_records = queries[mode]
    q_feats = q_bank.take(q_records)
    for s in shots:
      for t in trial_ids:
        g_records = galleries[(mode, s, t)]
        out.add(sysu_setting_name(mode, s), t, q_feats, q_records, g_bank.take(g_records),
                g_records, chunk_size)
  return out.finish()


def evaluate_regdb(extract_for_split: Callable[[int], Extract], root: str,
                   splits: Iterable[int] = range(1, 11),
                   directions: Sequence[str] = REGDB_DIRECTIONS, max_rank: int = 20,
                   chunk_size: int | None = None, rerank: dict | None = None,
                   test_sets: Callable[[int], tuple[Sequence[ImageRecord], Sequence[ImageRecord]]]
                   | None = None, progress: bool = False) -> dict:
  """RegDB: visible->thermal and thermal->visible on each split's test lists, mean over splits.

  RegDB trains one model per split, so the caller passes `extract_for_split(split) -> extract`,
  the extractor of the model trained on that split (with a single model: `lambda split: extract`;
  a training run of one split passes splits=(split,)). Each split's visible and thermal test
  images are extracted once and serve both directions. Scored with the AGW eval_regdb rules
  (nothing removed, standard CMC).
  test_sets: split -> (visible, thermal) test records (e.g. from prepared TFDS splits); None reads
    the split's lists under `root` (data_pipelines.regdb.test_sets).
  """
  from data_pipelines import regdb
  splits = [int(s) for s in splits]
  if not splits:
    raise ValueError("no RegDB splits to evaluate: pass splits within 1..10")
  for d in directions:
    if d not in REGDB_DIRECTIONS:
      raise ValueError(f"RegDB direction must be one of {REGDB_DIRECTIONS}, got {d!r}")
  out = _Collector("RegDB", "regdb", max_rank, "split", _check_rerank(rerank),
                   len(splits) * len(directions), progress)
  for split in splits:
    visible, thermal = test_sets(split) if test_sets is not None else regdb.test_sets(root, split)
    extract = extract_for_split(split)
    bank = FeatureBank(extract, list(visible) + list(thermal), f"RegDB split {split} test")
    sets = {"visible": (visible, bank.take(visible)), "thermal": (thermal, bank.take(thermal))}
    for d in directions:
      (q_records, q_feats), (g_records, g_feats) = (sets[m] for m in d.split("_to_"))
      out.add(direction_setting_name(d), split, q_feats, q_records, g_feats, g_records, chunk_size)
  return out.finish()


def evaluate_llcm(extract: Extract, root: str, trials: int | Sequence[int] = 10,
                  directions: Sequence[str] = LLCM_DIRECTIONS, layout: str = "deen",
                  max_rank: int = 20, chunk_size: int | None = None,
                  rerank: dict | None = None,
                  records: Sequence[ImageRecord] | None = None, progress: bool = False) -> dict:
  """LLCM: both search directions over `trials` gallery draws, as in the DEEN code base.

  For a direction, data_pipelines.llcm.query_set lists every test image of the query modality and
  gallery_set draws, per trial, one image per identity and camera of the other modality. Scored
  with DEEN's eval_llcm rules (same identity and same camera removed; unique-identity CMC).

  layout: DEEN's test.py ranks the two lists differently per direction. "deen" (default, the
  numbers DEEN publishes): infrared_to_visible ranks the drawn visible gallery for every infrared
  query; visible_to_infrared ranks ALL visible test images for each DRAWN infrared image (DEEN
  transposes the matrix for this direction; the setting's "note" says so in the report).
  "query_gallery": both directions rank the drawn gallery for every query image.
  records: the test records (llcm.test_records, or the prepared TFDS test splits); None lists them
    from `root`.
  """
  from data_pipelines import llcm
  if layout not in LLCM_LAYOUTS:
    raise ValueError(f"LLCM layout must be one of {LLCM_LAYOUTS}, got {layout!r}")
  for d in directions:
    if d not in LLCM_DIRECTIONS:
      raise ValueError(f"LLCM direction must be one of {LLCM_DIRECTIONS}, got {d!r}")
  trial_ids = _trial_list(trials)
  test = list(records) if records is not None else llcm.test_records(root)
  queries = {d: llcm.select_query(test, d) for d in directions}
  galleries = {(d, t): llcm.select_gallery(test, d, t) for d in directions for t in trial_ids}
  bank = FeatureBank(extract, [r for recs in queries.values() for r in recs]
                     + [r for recs in galleries.values() for r in recs], "LLCM test")
  out = _Collector("LLCM", "llcm", max_rank, "trial", _check_rerank(rerank), len(galleries),
                   progress)
  out.results["layout"] = layout
  for d in directions:
    transposed = layout == "deen" and d == "visible_to_infrared"
    for t in trial_ids:
      q_records, g_records = queries[d], galleries[(d, t)]
      if transposed:
        q_records, g_records = g_records, q_records
      out.add(direction_setting_name(d), t, bank.take(q_records), q_records, bank.take(g_records),
              g_records, chunk_size, note=DEEN_TRANSPOSED_NOTE if transposed else None)
  return out.finish()


def merge_splits(per_split: Sequence[dict]) -> dict:
  """One results dict from runs that each scored their own split (RegDB: one model per split).

  Every setting's trials are the splits in the given order; its mean is the mean over the splits,
  as RegDB results are reported.
  """
  if not per_split:
    raise ValueError("no per-split results to merge")
  first = per_split[0]
  out = {k: v for k, v in first.items() if k != "settings"}
  out["settings"] = {}
  seen = set()
  for res in per_split:
    for key in ("dataset", "protocol", "trial_key"):
      if res.get(key) != first.get(key):
        raise ValueError(f"cannot merge results with {key} {res.get(key)!r} and {first.get(key)!r}")
    if list(res["settings"]) != list(first["settings"]):
      raise ValueError(f"cannot merge results with settings {list(res['settings'])} and "
                       f"{list(first['settings'])}")
    for name, setting in res["settings"].items():
      merged = out["settings"].setdefault(
          name, {k: v for k, v in setting.items() if k not in ("trials", "mean")} | {"trials": []})
      merged["trials"] += setting["trials"]
    splits = {t[first["trial_key"]] for s in res["settings"].values() for t in s["trials"]}
    if splits & seen:
      raise ValueError(f"{first['trial_key']}(s) {sorted(splits & seen)} appear in two results")
    seen |= splits
  for setting in out["settings"].values():
    setting["mean"] = mean_of_trials(setting["trials"])
  return out


def headline(results: dict, setting: str | None = None) -> dict:
  """The mean metrics of one setting (default: the first), e.g. for picking the best checkpoint."""
  settings = results["settings"]
  name = setting if setting is not None else next(iter(settings))
  if name not in settings:
    raise KeyError(f"no setting {name!r}; have {list(settings)}")
  mean = settings[name]["mean"]
  return {k: mean[k] for k in _METRIC_KEYS}
