"""From an experiment config to a data set's training records and descriptions.

What differs between data sets (readers, protocol, sources) is in data_pipelines/registry.py.
"""
from __future__ import annotations

import json
import os
from typing import Any

from data_pipelines import registry
from data_pipelines.records import DatasetError, TrainSet


def load_train_set(dataset: Any) -> TrainSet:
  """Training records for `config.dataset` (name, root, split, holdout, source); see the registry."""
  return registry.load_train_set(dataset)


def ensure_synthetic(dataset: Any) -> None:
  """Generates the synthetic benchmark into `dataset.root` unless it is already there."""
  from data_pipelines import synthetic
  root, wanted = dataset.root, dict(dataset.generate)
  marker = os.path.join(root, synthetic.MARKER)
  if os.path.isfile(marker):
    with open(marker) as f:
      have = json.load(f).get("settings", {})
    have.setdefault("val_fraction", synthetic.VAL_FRACTION)  # written before the setting existed
    differ = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    if differ:
      raise DatasetError(
          f"{root} holds a synthetic set generated with other settings "
          f"({', '.join(f'{k}: {a!r} there, {b!r} in config.dataset.generate' for k, (a, b) in differ.items())}); "
          f"delete the folder to regenerate it, or point --config.dataset.root elsewhere")
    return
  if os.path.isfile(os.path.join(root, "exp", "test_id.txt")):
    raise DatasetError(f"{root} has exp/test_id.txt but no {synthetic.MARKER}: it is not a set this "
                       "generator wrote; point --config.dataset.root at an empty folder")
  print(f"Generating the synthetic benchmark into {root} ...", flush=True)
  synthetic.generate(root, **wanted)


def descriptions_path(dataset: Any) -> str:
  """The descriptions JSONL; relative paths are relative to the data set root."""
  path = dataset.descriptions
  if not path:
    raise DatasetError("config.dataset.descriptions is empty: EEES needs one description per training "
                       "image; generate them with `python -m eees_jax.describe` (docs/describe.md)")
  return path if os.path.isabs(path) else os.path.join(dataset.root, path)
