"""One entry point from an experiment config to a data set's training records and descriptions."""
from __future__ import annotations

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
  if name in ("sysu", "synthetic"):
    from data_pipelines import sysu_mm01
    return sysu_mm01.train_set(root)
  if name == "regdb":
    from data_pipelines import regdb
    return regdb.train_set(root, dataset.split)
  if name == "llcm":
    from data_pipelines import llcm
    return llcm.train_set(root)
  raise DatasetError(f"config.dataset.name={name!r} is not one of sysu, regdb, llcm, synthetic")


def ensure_synthetic(dataset: Any) -> None:
  """Generates the synthetic benchmark into `dataset.root` unless it is already there."""
  root = dataset.root
  if os.path.isfile(os.path.join(root, "exp", "test_id.txt")):
    return
  from data_pipelines import synthetic
  g = dataset.generate
  print(f"Generating the synthetic benchmark into {root} ...", flush=True)
  synthetic.generate(root, num_ids=g.num_ids, images_per_camera=g.images_per_camera,
                     height=g.height, width=g.width, seed=g.seed)


def descriptions_path(dataset: Any) -> str:
  """The descriptions JSONL; relative paths are relative to the data set root."""
  path = dataset.descriptions
  if not path:
    raise DatasetError("config.dataset.descriptions is empty: EEES needs one description per training "
                       "image; generate them with `python -m eees_jax.describe` (docs/describe.md)")
  return path if os.path.isabs(path) else os.path.join(dataset.root, path)
