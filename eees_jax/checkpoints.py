"""The workdir: orbax checkpoints of the train state, and everything that rebuilds the model from the
workdir alone.

    <workdir>/config.json                  the experiment config of the latest start
    <workdir>/checkpoints/<step>/state     TrainState (orbax); metrics (when evaluated)
    <workdir>/checkpoints/<step>/meta      JSON: step, epoch, the experiment config ("config") and
                                           the model record ("model", below)
    <workdir>/text_tower/<hash>.msgpack    a frozen text tower's parameters, written once
    <workdir>/tokenizer/<hash>/            copies of a tokenizer given as files (not 'clip')
    <workdir>/text_features/<key>.npy      cached description features of a frozen text tower

The model record of a checkpoint holds the ModelSpec (tower configs, classes, dtype), the input size,
the flip setting of the test-time feature, the tokenizer and where the text tower's parameters are
(the train state when it trains, else a text_tower file and its SHA-256). Every file other than
orbax's is written to a temporary name and renamed, so a crash never leaves a half-written file.
All workdir file access goes through the few functions under "Files" below.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

if TYPE_CHECKING:  # experiment imports text_features, which caches through this module
  from eees_jax.experiment import ModelSpec, TrainState

CHECKPOINTS = "checkpoints"
CONFIG = "config.json"
TEXT_TOWER = "text_tower"
TOKENIZER = "tokenizer"
TEXT_FEATURES = "text_features"
MODEL_RECORD_VERSION = 1


class WorkdirError(ValueError):
  """A workdir that cannot give what was asked (no checkpoints, no such step, old or corrupt)."""


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------

def _join(workdir: str, *parts: str) -> str:
  return os.path.join(workdir, *parts)


def _exists(path: str) -> bool:
  return os.path.exists(path)


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to a temporary file next to `path` and renames it into place."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """<workdir>/config.json (process 0; creates the workdir)."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    _write_atomic(_join(workdir, CONFIG), config.to_json_best_effort(indent=2).encode())


def read_text_features(workdir: str, key: str) -> np.ndarray | None:
  """Cached description features under `key`, or None."""
  path = _join(workdir, TEXT_FEATURES, f"{key}.npy")
  return np.load(io.BytesIO(_read_bytes(path))) if _exists(path) else None


def write_text_features(workdir: str, key: str, features: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, features)
  _write_atomic(_join(workdir, TEXT_FEATURES, f"{key}.npy"), buf.getvalue())


# ----------------------------------------------------------------------------------------------
# Orbax: the train state.
# ----------------------------------------------------------------------------------------------

def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keeps the last `keep_checkpoints` checkpoints and the best one by `config.eval.best_metric`
  (whose metrics are stored with the checkpoint, so the best survives a restart)."""
  best = config.eval.best_metric

  def score(metrics: dict) -> float:  # checkpoints saved without evaluation never count as best
    return float(metrics.get(best, float("-inf")))

  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=config.train.keep_checkpoints),
      checkpoint_managers.BestN(get_metric_fn=score, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True, best_fn=score,
                                         best_mode="max", enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(_join(workdir, CHECKPOINTS)),
                               options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: dict,
         metrics: dict | None = None) -> None:
  """Saves `state` with `meta` (JSON) and the evaluation `metrics` of this step, if any."""
  step = int(jax.device_get(state.step))
  if mngr.latest_step() == step:
    return
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=dict(metrics or {}), force=True)


def restore(mngr: ocp.CheckpointManager, state: TrainState) -> tuple[TrainState, dict]:
  """Restores the latest checkpoint into `state`'s shardings, whatever it was saved with."""
  step = mngr.latest_step()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})


# ----------------------------------------------------------------------------------------------
# What rebuilds the model: written by training, read by inference.
# ----------------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def hash_tree(h: Any, tree: Any) -> None:
  """Feeds every leaf of a pytree (path and bytes, in path order) into the hashlib object `h`."""
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: str(kv[0])):
    h.update(str(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())


def _tokenizer_files(spec: str) -> list[str]:
  if os.path.isdir(spec):
    return [os.path.join(spec, "vocab.json"), os.path.join(spec, "merges.txt")]
  return [spec]


def _record_tokenizer(workdir: str, spec: str | None, write: bool) -> dict:
  """'clip' (the vocabulary of the clip-anytorch package) as is; a tokenizer given as files is
  copied into <workdir>/tokenizer/<hash>/ so the workdir does not depend on them."""
  if spec in (None, "", "clip"):
    return {"kind": "clip"}
  files = _tokenizer_files(spec)
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f"config.text.tokenizer={spec!r}: missing {missing}")
  contents = [_read_bytes(f) for f in files]
  digest = _sha256(b"".join(_sha256(c).encode() for c in contents))[:16]
  folder = os.path.join(TOKENIZER, digest)
  if write:
    for f, c in zip(files, contents):
      target = _join(workdir, folder, os.path.basename(f))
      if not _exists(target):
        _write_atomic(target, c)
  path = folder if os.path.isdir(spec) else os.path.join(folder, os.path.basename(spec))
  return {"kind": "files", "path": path, "source": spec}


def _record_text_tower(workdir: str, text_params: Any | None, write: bool) -> dict:
  """A frozen tower's parameters go once into <workdir>/text_tower/<hash>.msgpack."""
  if text_params is None:
    return {"source": "state"}
  data = flax.serialization.msgpack_serialize(
      {"params": jax.tree.map(np.asarray, flax.core.unfreeze(text_params))})
  digest = _sha256(data)
  path = os.path.join(TEXT_TOWER, f"{digest[:16]}.msgpack")
  if write and not _exists(_join(workdir, path)):
    _write_atomic(_join(workdir, path), data)
  return {"source": "file", "path": path, "sha256": digest}


def write_model_record(workdir: str, config: ml_collections.ConfigDict, spec: ModelSpec,
                       text_params: Any | None) -> dict:
  """Writes the text tower (when frozen) and tokenizer files into the workdir (process 0) and
  returns the model record that every checkpoint's meta carries (under "model")."""
  write = jax.process_index() == 0
  return {
      "version": MODEL_RECORD_VERSION,
      "spec": spec.to_json(),
      "height": int(config.input.height),
      "width": int(config.input.width),
      "flip": bool(config.eval.flip),
      "tokenizer": _record_tokenizer(workdir, config.text.tokenizer, write),
      "text_tower": _record_text_tower(workdir, text_params, write),
  }


def checkpoint_meta(config: ml_collections.ConfigDict, record: dict) -> dict:
  """The part of every checkpoint's meta that describes the run (config and model record)."""
  return {"config": json.loads(config.to_json_best_effort()), "model": record}


# --- reading ---------------------------------------------------------------------------------

def _drop_read_only_notice(record: logging.LogRecord) -> bool:
  return "is read only" not in record.getMessage()


def open_read_only(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads <workdir>/checkpoints; WorkdirError when it holds no checkpoint."""
  folder = _join(workdir, CHECKPOINTS)
  hint = (f"train a model there first (python -m eees_jax.main --config=... --workdir={workdir})")
  if not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} does not exist; {hint}")
  if not os.path.isdir(folder):
    raise WorkdirError(f"workdir {workdir} holds no checkpoints (no {folder}); {hint}")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_drop_read_only_notice)  # orbax warns that it was asked to only read
  try:
    mngr = ocp.CheckpointManager(os.path.abspath(folder), options=options,
                                 item_names=("state", "meta"))
  finally:
    absl_logger.removeFilter(_drop_read_only_notice)
  if not mngr.all_steps():
    mngr.close()
    raise WorkdirError(f"workdir {workdir} holds no finished checkpoint in {folder}; {hint}")
  return mngr


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return dict(restored["meta"] or {})


def select_step(mngr: ocp.CheckpointManager, step: str | int, workdir: str) -> int:
  """'latest', 'best' (by the run's config.eval.best_metric, among evaluated checkpoints) or a step."""
  steps = sorted(mngr.all_steps())
  if step == "latest":
    return steps[-1]
  if step == "best":
    config = read_meta(mngr, steps[-1]).get("config") or {}
    metric = config.get("eval", {}).get("best_metric", "mAP")
    scored = [(m[metric], s) for s in steps
              if isinstance(m := mngr.metrics(s), dict) and metric in m]
    if not scored:
      raise WorkdirError(f"no checkpoint of {workdir} has evaluation metrics ({metric}) to pick "
                         f"the best by; use step='latest' or one of the steps {steps}")
    return max(scored)[1]
  if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
    if int(step) not in steps:
      raise WorkdirError(f"{workdir} has no checkpoint of step {int(step)}; its steps are {steps}")
    return int(step)
  raise WorkdirError(f"step={step!r}: expected 'latest', 'best' or a step number ({steps})")


def model_record(meta: dict, workdir: str, step: int) -> dict:
  """The model record of a checkpoint's meta; WorkdirError for checkpoints written before it."""
  record = meta.get("model")
  if not isinstance(record, dict) or "spec" not in record:
    raise WorkdirError(
        f"checkpoint {step} of {workdir} was written before checkpoints recorded the model (tower "
        "configs, number of classes, text tower, tokenizer), so it cannot be rebuilt from the "
        "workdir alone; train it again with this version of eees-jax")
  if record.get("version") != MODEL_RECORD_VERSION:
    raise WorkdirError(f"checkpoint {step} of {workdir} has model record version "
                       f"{record.get('version')!r}; this code reads version {MODEL_RECORD_VERSION}")
  return record


def restore_subtree(mngr: ocp.CheckpointManager, step: int, abstract: Any) -> Any:
  """The part of a checkpoint's train state given by `abstract` (a dict like
  {"params": {"model": ...}, "batch_stats": ...} of jax.ShapeDtypeStruct with shardings)."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=restore_args, partial_restore=True)))
  return restored["state"]


def read_text_tower(workdir: str, record: dict) -> Any:
  """The frozen text tower's parameters named by a model record (checked against its SHA-256)."""
  entry = record["text_tower"]
  path = _join(workdir, entry["path"])
  if not _exists(path):
    raise WorkdirError(f"{path} is missing: the frozen text tower of this model; the workdir is "
                       "incomplete (copy the whole workdir, not only checkpoints/)")
  data = _read_bytes(path)
  if _sha256(data) != entry["sha256"]:
    raise WorkdirError(f"{path} is corrupt: its SHA-256 differs from the one its checkpoint "
                       "recorded")
  return flax.serialization.msgpack_restore(data)["params"]


def tokenizer_spec(workdir: str, record: dict) -> str:
  """The argument for tokenizer.build_tokenizer that the model record names."""
  entry = record["tokenizer"]
  if entry["kind"] == "clip":
    return "clip"
  path = _join(workdir, entry["path"])
  if not _exists(path):
    raise WorkdirError(f"{path} is missing: the tokenizer files of this model")
  return path
