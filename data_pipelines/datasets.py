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
    # Settings the generator records only when on are off where absent, in the set or the config.
    have = {**synthetic.SETTINGS_OFF_WHEN_ABSENT, **written.get("settings", {})}
    wanted = {**synthetic.SETTINGS_OFF_WHEN_ABSENT, **wanted}
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
