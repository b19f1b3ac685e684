"""One entry point from an experiment config to a data set's training records and descriptions."""
from __future__ import annotations

import json
import os
from typing import Any

from data_pipelines.records import DatasetError, TrainSet

_DOWNLOAD_HINTS = {
    "sysu": "SYSU-MM01 is distributed by its authors on request (see the README, 'Real data sets'); "
            "unpack it and pass --config.dataset.root=<folder with cam1..cam6 and exp/>",
    "regdb": "RegDB is distributed by its authors on request; unpack it and pass "
             "--config.dataset.root=<folder with idx/ and the image folders>",
    "llcm": "LLCM is distributed by its authors on request; unpack it and pass "
            "--config.dataset.root=<folder with idx/ and the image folders>",
}


def load_train_set(dataset: Any) -> TrainSet:
  """Training records for `config.dataset` (name, root, split)."""
  name, root = dataset.name, dataset.root
  if name == "synthetic":
    ensure_synthetic(dataset)
  if not root or not os.path.isdir(root):
    raise DatasetError(f"config.dataset.root={root!r} is not a folder. {_DOWNLOAD_HINTS.get(name, '')}")
  holdout = bool(dataset.get("holdout", False))
  if holdout and name not in ("sysu", "synthetic"):
    raise DatasetError(f"config.dataset.holdout=True needs a validation id list (SYSU-MM01 layout: "
                       f"exp/val_id.txt); {name} has none. Set --config.dataset.holdout=False")
  if name in ("sysu", "synthetic"):
    from data_pipelines import sysu_mm01
    return sysu_mm01.train_set(root, holdout=holdout)
  if name == "regdb":
    from data_pipelines import regdb
    return regdb.train_set(root, dataset.split)
  if name == "llcm":
    from data_pipelines import llcm
    return llcm.train_set(root)
  raise DatasetError(f"config.dataset.name={name!r} is not one of sysu, regdb, llcm, synthetic")


def ensure_synthetic(dataset: Any) -> None:
  """Generates the synthetic set `dataset.generate` describes into `dataset.root` unless it is there.

  A folder holding a set made with other settings, or by an older generator, is refused.
  """
  from data_pipelines import synthetic
  root, wanted = dataset.root, dict(dataset.generate)
  marker = os.path.join(root, synthetic.MARKER)
  if os.path.isfile(marker):
    with open(marker) as f:
      written = json.load(f)
    if written.get("version") != synthetic.VERSION:
      raise DatasetError(
          f"{root} holds a synthetic set of generator version {written.get('version')}, this code "
          f"writes version {synthetic.VERSION} (captions with gaps, a pretraining set); delete the "
          "folder to regenerate it")
    have = written.get("settings", {})
    differ = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    if differ:
      raise DatasetError(
          f"{root} holds a synthetic set generated with other settings "
          f"({', '.join(f'{k}: {a!r} there, {b!r} in the config' for k, (a, b) in differ.items())}); "
          f"delete the folder to regenerate it, or point the config's root elsewhere")
    return
  if os.path.isdir(root) and os.listdir(root):
    raise DatasetError(f"{root} is not empty and holds no {synthetic.MARKER}: it is not a set this "
                       "generator wrote; point the config's root at an empty or missing folder")
  print(f"Generating the synthetic set into {root} ...", flush=True)
  synthetic.generate(root, workers=min(os.cpu_count() or 1, 4), verbose=True, **wanted)


def descriptions_path(dataset: Any) -> str:
  """The descriptions JSONL; relative paths are relative to the data set root."""
  path = dataset.descriptions
  if not path:
    raise DatasetError("config.dataset.descriptions is empty: EEES needs one description per training "
                       "image; generate them with `python -m eees_jax.describe` (docs/describe.md)")
  return path if os.path.isabs(path) else os.path.join(dataset.root, path)
