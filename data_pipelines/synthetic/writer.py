"""Writing a synthetic set to disk in the SYSU-MM01 layout, published atomically.

  python -m data_pipelines.synthetic --out DIR [--num_ids 120 --num_test 40 --images_per_camera 5
      --height 128 --width 64 --seed 0 --purpose benchmark|pretrain --workers 2 --overwrite]

Writes, under DIR:
  cam1 .. cam6/<pid:04d>/<n:04d>.jpg     visible cameras 1, 2, 4, 5 (RGB); infrared 3, 6 (R = G = B)
  exp/train_id.txt, val_id.txt, test_id.txt   one line of comma-separated ids each (a pretraining
                                         set has every id in train_id.txt and no val / test ids)
  descriptions.jsonl                     one imitation-VLM caption per image (SPEC section 4 format)
  captions.jsonl                         per image: what it shows, what its caption states, and
                                         whether each stated attribute is right
  synthetic.json                         the settings, every identity's attributes, the oracle

The set is assembled in a hidden staging folder beside DIR and published with renames: a crash or
kill at any moment leaves either the previous set or the new one (plus, at worst, a hidden staging
folder that the next run removes), never a half-written DIR. Output is byte-identical for a given
seed and settings whatever the number of workers (each image has its own random stream).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

from data_pipelines import descriptions as descriptions_lib
from data_pipelines.records import DatasetError
from data_pipelines.synthetic import captions, oracle
from data_pipelines.synthetic.identities import (CAMERAS, INFRARED_ATTRIBUTES, INFRARED_CAMERAS,
                                                  SHARED_ATTRIBUTES, VAL_FRACTION, Identity,
                                                  assign_splits, sample_identity)
from data_pipelines.synthetic.render import CAMERA_SETTINGS, Scene, encode_jpeg, render_image

GENERATOR = "data_pipelines.synthetic"
VERSION = 2
MARKER = "synthetic.json"
DESCRIPTIONS = "descriptions.jsonl"
CAPTION_TRUTH = "captions.jsonl"
PURPOSES = ("benchmark", "pretrain")
# Settings recorded in synthetic.json only when on (added after sets were written), with their value
# when absent.
SETTINGS_OFF_WHEN_ABSENT = {"visible_only": False}
_STAGING_PREFIX = ".synthetic-staging-"
_RETIRED_PREFIX = ".synthetic-retired-"
_OUTPUTS = tuple(f"cam{c}" for c in CAMERAS) + ("exp", DESCRIPTIONS, CAPTION_TRUTH, MARKER)


def _render_job(job: tuple) -> bytes:
  identity, camid, index, height, width, seed, scene = job
  return encode_jpeg(render_image(identity, camid, index, height, width, seed, scene),
                     CAMERA_SETTINGS[camid].quality)


def _check_out(out: str, overwrite: bool) -> None:
  """Refuses a non-empty folder unless overwriting a previous output of this generator."""
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise DatasetError(f"--out {out} exists and is not a folder")
  entries = os.listdir(out)
  if not entries:
    return
  if not overwrite:
    raise DatasetError(f"--out {out} exists and is not empty; pass --overwrite to replace a previous "
                       "synthetic data set there, or choose another folder")
  if MARKER not in entries:
    raise DatasetError(f"--out {out} is not empty and holds no {MARKER}, so it was not written by this "
                       "generator; refusing to overwrite it. Choose another folder.")


def _remove_leftovers(parent: str, name: str) -> None:
  """Removes staging / retired folders that a killed run of this generator left beside `name`."""
  for entry in os.listdir(parent):
    if entry.startswith((_STAGING_PREFIX + name + "-", _RETIRED_PREFIX + name + "-")):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _publish(staging: str, out: str) -> None:
  """Makes `staging` the folder `out`, keeping files of `out` that are not generator outputs."""
  if os.path.isdir(out) and os.listdir(out):
    for entry in os.listdir(out):  # e.g. a user's notes: carried over into the new set
      if entry not in _OUTPUTS:
        os.replace(os.path.join(out, entry), os.path.join(staging, entry))
    parent, name = os.path.split(out)
    retired = tempfile.mkdtemp(prefix=f"{_RETIRED_PREFIX}{name}-", dir=parent)
    os.replace(out, os.path.join(retired, "set"))
    os.replace(staging, out)
    shutil.rmtree(retired, ignore_errors=True)
  else:
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(staging, out)


def settings_of(num_ids: int, images_per_camera: int, height: int, width: int, seed: int,
                val_fraction: float, num_test: int | None, purpose: str,
                noise: captions.CaptionNoise, scene: Scene, visible_only: bool = False) -> dict:
  """The settings recorded in synthetic.json (and compared by data_pipelines.datasets); those of
  SETTINGS_OFF_WHEN_ABSENT only when on, so sets written before they existed keep their settings."""
  settings = {"num_ids": num_ids, "images_per_camera": images_per_camera, "height": height,
              "width": width, "seed": seed, "val_fraction": val_fraction, "num_test": num_test,
              "purpose": purpose, **dataclasses.asdict(noise), **dataclasses.asdict(scene),
              "visible_only": visible_only}
  return {k: v for k, v in settings.items()
          if k not in SETTINGS_OFF_WHEN_ABSENT or v != SETTINGS_OFF_WHEN_ABSENT[k]}


def generate(out: str, num_ids: int = 120, images_per_camera: int = 5, height: int = 128,
             width: int = 64, seed: int = 0, val_fraction: float = VAL_FRACTION,
             num_test: int | None = None, purpose: str = "benchmark", workers: int = 1,
             overwrite: bool = False, min_slots: int = 3, max_slots: int = 6,
             visible_wrong: float = 0.05, ir_colour_missing: float = 0.5,
             ir_colour_wrong: float = 0.25, visible_colour_missing: float = 0.0, clutter: float = 0.5, far_prob: float = 0.1,
             occluder_prob: float = 0.1, visible_only: bool = False, verbose: bool = False) -> dict:
  """Writes a synthetic set to `out` and returns a summary.

  purpose="benchmark": ids split into test (`num_test`, default a third), val (`val_fraction`) and
  train. purpose="pretrain": every id is a training id (the CLIP pretraining set of SPEC section 6;
  give it its own seed so its people are not the benchmark's). visible_only (pretraining sets
  only) renders the visible cameras alone: every visible image, caption and identity is what the
  full set would hold, without the infrared images a visible-only pretraining discards.
  Returns: {"out" (absolute), "given" (`out` as passed), "ids": {split: count},
  "images_per_camera": {camid: count}, "images", "descriptions", "oracle": {...} (benchmark only),
  "seconds", "settings"}.
  """
  start = time.perf_counter()
  if images_per_camera < 1 or height < 16 or width < 8:
    raise ValueError("need images_per_camera >= 1, height >= 16 and width >= 8, got "
                     f"{images_per_camera}, {height}, {width}")
  if purpose not in PURPOSES:
    raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
  if visible_only and purpose != "pretrain":
    raise ValueError("visible_only=True is for pretraining sets (purpose='pretrain'): a benchmark "
                     "needs its infrared cameras")
  noise = captions.CaptionNoise(min_slots=min_slots, max_slots=max_slots,
                                visible_wrong=visible_wrong, ir_colour_missing=ir_colour_missing,
                                ir_colour_wrong=ir_colour_wrong,
                                visible_colour_missing=visible_colour_missing)
  scene = Scene(clutter=clutter, far_prob=far_prob, occluder_prob=occluder_prob)
  given = os.fspath(out)   # what messages show: the caller's path, not this machine's absolute one
  out = os.path.abspath(given)
  _check_out(given, overwrite)
  if purpose == "benchmark":
    splits = assign_splits(seed, num_ids, val_fraction, num_test)
  else:
    if num_ids < 1:
      raise ValueError(f"num_ids must be at least 1, got {num_ids}")
    splits = {pid: "pretrain" for pid in range(1, num_ids + 1)}
  identities = [sample_identity(seed, pid, splits[pid]) for pid in range(1, num_ids + 1)]
  jobs = [(identity, camid, index, height, width, seed, scene)
          for identity in identities for camid in identity.cameras
          if not (visible_only and camid in INFRARED_CAMERAS)
          for index in range(1, images_per_camera + 1)]
  settings = settings_of(num_ids, images_per_camera, height, width, seed, val_fraction, num_test,
                         purpose, noise, scene, visible_only)

  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  _remove_leftovers(parent, name)
  staging = tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{name}-", dir=parent)
  try:
    if workers > 1:
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        _write_images(staging, jobs, pool.imap(_render_job, jobs, chunksize=32), verbose)
    else:
      _write_images(staging, jobs, map(_render_job, jobs), verbose)
    _write_id_files(staging, identities, purpose)
    records, truths = _describe_all(jobs, seed, noise, scene)
    descriptions_lib.write_records(os.path.join(staging, DESCRIPTIONS), records)
    with open(os.path.join(staging, CAPTION_TRUTH), "w", encoding="utf-8") as f:
      for t in truths:
        f.write(json.dumps(t, sort_keys=True) + "\n")
    ceiling = _oracle(identities, images_per_camera) if purpose == "benchmark" else None
    with open(os.path.join(staging, MARKER), "w") as f:
      json.dump({"generator": GENERATOR, "version": VERSION, "settings": settings,
                 "oracle": ceiling, "identities": [dataclasses.asdict(i) for i in identities]},
                f, indent=1)
      f.write("\n")
    _publish(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)

  summary = {
      "out": out, "given": given,
      "ids": {s: sum(1 for i in identities if i.split == s)
              for s in (("train", "val", "test") if purpose == "benchmark" else ("pretrain",))},
      "images_per_camera": {c: sum(1 for j in jobs if j[1] == c) for c in CAMERAS},
      "images": len(jobs), "descriptions": len(records), "oracle": ceiling,
      "seconds": round(time.perf_counter() - start, 2), "settings": settings}
  if verbose:
    print(format_summary(summary), flush=True)
  return summary


def _oracle(identities: Sequence[Identity], images_per_camera: int) -> dict:
  num, distinct = oracle.distinct_signatures(identities)
  rank1 = lambda mode, attrs: round(oracle.expected_rank1(identities, images_per_camera, mode=mode,
                                                          attributes=attrs), 2)
  return {"rank1_all": rank1("all", INFRARED_ATTRIBUTES), "rank1_indoor": rank1("indoor", INFRARED_ATTRIBUTES),
          "cross_modal_rank1_all": rank1("all", SHARED_ATTRIBUTES),
          "cross_modal_rank1_indoor": rank1("indoor", SHARED_ATTRIBUTES),
          "test_ids": num, "test_ids_with_unique_infrared_attributes": distinct}


def _describe_all(jobs: Sequence[tuple], seed: int, noise: captions.CaptionNoise, scene: Scene
                  ) -> tuple[list[dict], list[dict]]:
  records, truths = [], []
  for identity, camid, index, *_ in jobs:
    infrared = camid in INFRARED_CAMERAS
    text, truth = captions.describe(identity, camid, index, seed, noise, infrared, scene)
    image = f"cam{camid}/{identity.pid:04d}/{index:04d}.jpg"
    records.append({
        "image": image, "modality": "infrared" if infrared else "visible", "description": text,
        "rewritten": None, "model": captions.CAPTIONER,
        "prompt": captions.INFRARED_PROMPT if infrared else captions.VISIBLE_PROMPT,
        "rewrite_model": None, "rewrite_prompt": None,
        "generation": {"generator": GENERATOR, "seed": seed, **dataclasses.asdict(noise),
                       **dataclasses.asdict(scene)},
        "flags": []})
    truths.append({"image": image, "pid": identity.pid, "camid": camid, **truth})
  order = sorted(range(len(records)), key=lambda i: records[i]["image"])
  return [records[i] for i in order], [truths[i] for i in order]


def _write_id_files(root: str, identities: Sequence[Identity], purpose: str) -> None:
  os.makedirs(os.path.join(root, "exp"))
  for split in ("train", "val", "test"):
    wanted = ("pretrain",) if purpose == "pretrain" and split == "train" else (split,)
    ids = sorted(i.pid for i in identities if i.split in wanted)
    with open(os.path.join(root, "exp", f"{split}_id.txt"), "w") as f:
      f.write(",".join(str(i) for i in ids) + "\n")


def _write_images(root: str, jobs: Sequence[tuple], encoded, verbose: bool) -> None:
  from tqdm import tqdm
  for (identity, camid, index, *_), data in tqdm(zip(jobs, encoded), total=len(jobs), unit="img",
                                                 desc="rendering", disable=not verbose, leave=False):
    folder = os.path.join(root, f"cam{camid}", f"{identity.pid:04d}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{index:04d}.jpg"), "wb") as f:
      f.write(data)


def format_summary(summary: dict) -> str:
  ids = summary["ids"]
  cams = ", ".join(f"cam{c} {n}" for c, n in summary["images_per_camera"].items())
  if "test" in ids:
    who = f"{ids['train']} train + {ids['val']} val (training), {ids['test']} test"
  else:
    who = f"{ids['pretrain']} (pretraining set: no test identities)"
  lines = [f"synthetic SYSU-MM01 layout written to {summary['given']}",
           f"  identities: {who}",
           f"  images: {summary['images']} ({cams})",
           f"  descriptions: {summary['descriptions']} in {DESCRIPTIONS} (truth in {CAPTION_TRUTH})"]
  o = summary.get("oracle")
  if o:
    lines.append(f"  attribute-oracle Rank-1 (knows what infrared shows): all-search {o['rank1_all']:.1f}, "
                 f"indoor {o['rank1_indoor']:.1f}; {o['test_ids_with_unique_infrared_attributes']} of "
                 f"{o['test_ids']} test ids have unique infrared attributes")
    lines.append(f"  cross-modal oracle Rank-1 (knows what both modalities show): all-search "
                 f"{o['cross_modal_rank1_all']:.1f}, indoor {o['cross_modal_rank1_indoor']:.1f}")
  lines.append(f"  time: {summary['seconds']:.1f} s")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--out", required=True, help="folder to write the data set to")
  parser.add_argument("--num_ids", type=int, default=120)
  parser.add_argument("--num_test", type=int, default=None, help="test ids (default: a third)")
  parser.add_argument("--images_per_camera", type=int, default=5)
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--purpose", choices=PURPOSES, default="benchmark")
  parser.add_argument("--val_fraction", type=float, default=VAL_FRACTION,
                      help="share of identities in exp/val_id.txt (held out by --config.dataset.holdout)")
  parser.add_argument("--workers", type=int, default=1, help="rendering processes")
  parser.add_argument("--min_slots", type=int, default=3, help="fewest attributes a caption names")
  parser.add_argument("--max_slots", type=int, default=6, help="most attributes a caption names")
  parser.add_argument("--visible_wrong", type=float, default=0.05,
                      help="probability that a stated attribute is wrong")
  parser.add_argument("--ir_colour_missing", type=float, default=0.5,
                      help="probability that an infrared caption omits a colour")
  parser.add_argument("--ir_colour_wrong", type=float, default=0.25,
                      help="probability that an infrared caption names a wrong colour")
  parser.add_argument("--visible_colour_missing", type=float, default=0.0,
                      help="probability that a visible caption omits a colour (alt-text style)")
  parser.add_argument("--clutter", type=float, default=0.5,
                      help="contrast of the background clutter (0: plain backgrounds)")
  parser.add_argument("--far_prob", type=float, default=0.1, help="share of distant, small people")
  parser.add_argument("--occluder_prob", type=float, default=0.1,
                      help="share of images with a railing or a pole in front of the person")
  parser.add_argument("--visible_only", action="store_true",
                      help="pretraining sets: render the visible cameras only")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a data set this generator wrote before in --out")
  args = parser.parse_args(argv)
  try:
    generate(args.out, args.num_ids, args.images_per_camera, args.height, args.width, args.seed,
             val_fraction=args.val_fraction, num_test=args.num_test, purpose=args.purpose,
             workers=args.workers, overwrite=args.overwrite, min_slots=args.min_slots,
             max_slots=args.max_slots, visible_wrong=args.visible_wrong,
             ir_colour_missing=args.ir_colour_missing, ir_colour_wrong=args.ir_colour_wrong,
             visible_colour_missing=args.visible_colour_missing, clutter=args.clutter,
             far_prob=args.far_prob, occluder_prob=args.occluder_prob,
             visible_only=args.visible_only, verbose=True)
  except (DatasetError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
