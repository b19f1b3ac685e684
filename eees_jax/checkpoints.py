"""The workdir: orbax checkpoints of the train state, and everything that rebuilds the model from the
workdir alone. A workdir is a local folder or a cloud URI (gs://bucket/run): every file goes through
etils.epath, the path library orbax itself uses.

    <workdir>/config.json                  the experiment config of the latest successful start
    <workdir>/checkpoints/<step>/state     TrainState (orbax); metrics (held-out val runs only)
    <workdir>/checkpoints/<step>/meta      JSON: step, epoch, the experiment config ("config") and
                                           the model record ("model", below)
    <workdir>/corrupt_checkpoints/<step>/  checkpoints that could not be restored, moved aside
    <workdir>/text_tower/<hash>.msgpack    a frozen text tower's parameters, written once
    <workdir>/tokenizer/<hash>/            copies of a tokenizer given as files (not 'clip')
    <workdir>/text_features/<key>.npy      cached description features of a frozen text tower

Checkpoints say what they hold. A run with a validation split (config.dataset.holdout) keeps the
latest `keep_checkpoints` and the best one by its val metrics; any other run keeps only the latest
(choosing by test metrics would select on the test identities). A state with a non-finite leaf is
never saved. A resumed run's config must equal the one stored with the checkpoint, except for the
keys config_validation.RESUME_NEUTRAL names. A checkpoint that does not restore (a truncated file)
is moved aside with a warning and the previous one is used.

The model record of a checkpoint holds the ModelSpec (tower configs, classes, dtype), the input size,
the flip setting of the test-time feature, the tokenizer and where the text tower's parameters are
(the train state when it trains, else a text_tower file and its SHA-256). Every file other than
orbax's is written to a temporary name and renamed (local folders) or written as one object (cloud
storage), so a crash never leaves a half-written file. All workdir file access goes through the
few functions under "Files" below.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from eees_jax import config_validation, sharding

if TYPE_CHECKING:  # experiment imports text_features, which caches through this module
  from eees_jax.experiment import ModelSpec, TrainState

CHECKPOINTS = "checkpoints"
CORRUPT = "corrupt_checkpoints"
CONFIG = "config.json"
TEXT_TOWER = "text_tower"
TOKENIZER = "tokenizer"
TEXT_FEATURES = "text_features"
MODEL_RECORD_VERSION = 1


class WorkdirError(ValueError):
  """A workdir that cannot give what was asked (no checkpoints, no such step, old or corrupt)."""


class ResumeConfigError(WorkdirError):
  """The workdir's checkpoint was written with another config than the one given."""


class NonFiniteStateError(FloatingPointError):
  """A train state with NaN or infinite leaves; it was not saved."""


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------

def path(workdir: str | os.PathLike, *parts: str) -> epath.Path:
  """<workdir>/<parts> as an epath.Path (a local path, or a cloud URI such as gs://bucket/run)."""
  return epath.Path(workdir).joinpath(*parts)


def is_local(workdir: str | os.PathLike) -> bool:
  return "://" not in os.fspath(workdir)


def _exists(p: epath.Path) -> bool:
  return p.exists()


def _read_bytes(p: epath.Path) -> bytes:
  return p.read_bytes()


def _write_atomic(p: epath.Path, data: bytes) -> None:
  """Writes `data` to `p`: locally through a temporary file renamed into place; on cloud storage
  as one object, which is never visible half-written."""
  p.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(p):
    p.write_bytes(data)
    return
  tmp = p.parent / f"{p.name}.tmp{os.getpid()}"
  tmp.write_bytes(data)
  tmp.replace(p)


def read_text(p: str | os.PathLike) -> str:
  return epath.Path(p).read_text()


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """<workdir>/config.json (process 0). Written once a start has passed every check."""
  if jax.process_index() == 0:
    _write_atomic(path(workdir, CONFIG), config.to_json_best_effort(indent=2).encode())


def read_text_features(workdir: str, key: str) -> np.ndarray | None:
  """Cached description features under `key`, or None."""
  p = path(workdir, TEXT_FEATURES, f"{key}.npy")
  return np.load(io.BytesIO(_read_bytes(p))) if _exists(p) else None


def write_text_features(workdir: str, key: str, features: np.ndarray) -> None:
  if jax.process_index() != 0:
    return
  buf = io.BytesIO()
  np.save(buf, features)
  _write_atomic(path(workdir, TEXT_FEATURES, f"{key}.npy"), buf.getvalue())


# ----------------------------------------------------------------------------------------------
# Orbax: the train state.
# ----------------------------------------------------------------------------------------------

def _orbax_dir(workdir: str) -> epath.Path:
  """<workdir>/checkpoints, absolute when local (orbax's tensorstore driver needs that)."""
  if is_local(workdir):
    return epath.Path(os.path.abspath(os.path.join(workdir, CHECKPOINTS)))
  return path(workdir, CHECKPOINTS)


def keeps_best(config: ml_collections.ConfigDict) -> bool:
  """Whether a run selects a best checkpoint: only on a validation split, never on test ids."""
  return bool(config.dataset.get("holdout", False))


def selection_note(config: ml_collections.ConfigDict) -> str:
  """What the run's checkpoints are, for its report."""
  if keeps_best(config):
    return (f"Checkpoints: the latest {config.train.keep_checkpoints} and the best by held-out val "
            f"{config.eval.best_metric} among the evaluations during training "
            "(config.train.eval_every_epochs); this report is the final step's.")
  return ("Checkpoints: the latest only (no validation split, config.dataset.holdout=False: a best "
          "checkpoint chosen on test identities would be selected on the test set); this report "
          "is the final step's.")


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Keeps the last `keep_checkpoints` checkpoints and, on a run with a validation split, the best
  one by `config.eval.best_metric` (its val metrics are stored with the checkpoint, so the best
  survives a restart)."""
  policies = [checkpoint_managers.LatestN(n=config.train.keep_checkpoints)]
  best_fn = None
  if keeps_best(config):
    best = config.eval.best_metric

    def best_fn(metrics: dict) -> float:  # checkpoints saved without evaluation never count
      return float(metrics.get(best, float("-inf")))

    policies.append(checkpoint_managers.BestN(get_metric_fn=best_fn, n=1,
                                              keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies), create=True,
      best_fn=best_fn, best_mode="max", enable_async_checkpointing=True)
  return ocp.CheckpointManager(_orbax_dir(workdir), options=options, item_names=("state", "meta"))


@jax.jit
def _non_finite_counts(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.sum(~jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.zeros((), jnp.int32), tree)


def non_finite_leaves(state: TrainState) -> list[str]:
  """Paths of the state's float leaves (parameters, BatchNorm statistics, optimiser state) that
  hold a NaN or an infinity. One jitted reduction; works on sharded states."""
  counts = jax.device_get(_non_finite_counts({"params": state.params,
                                              "batch_stats": state.batch_stats,
                                              "opt_state": state.opt_state}))
  return [jax.tree_util.keystr(p) for p, n in jax.tree_util.tree_leaves_with_path(counts) if n]


def save(mngr: ocp.CheckpointManager, state: TrainState, meta: dict,
         metrics: dict | None = None) -> bool:
  """Saves `state` with `meta` (JSON) and the val `metrics` of this step, if any; False when that
  step is already saved. Raises NonFiniteStateError (and saves nothing) for a non-finite state."""
  step = int(jax.device_get(state.step))
  if step in mngr.all_steps():
    return False
  bad = non_finite_leaves(state)
  if bad:
    latest = mngr.latest_step()
    raise NonFiniteStateError(
        f"the train state of step {step} has non-finite values in {len(bad)} leaves "
        f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); it was not saved"
        + (f", and the latest checkpoint (step {latest}) is finite" if latest is not None else "")
        + ". Lower config.optim.lr or enable config.optim.grad_clip, then rerun.")
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=dict(metrics) if metrics else None, force=True)
  return True


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def check_resume_config(recorded: dict | None, config: ml_collections.ConfigDict, workdir: str,
                        step: int) -> None:
  """Refuses to resume checkpoint `step` with a config that differs from the one it was written
  with in a key that changes the steps already taken (config_validation.RESUME_NEUTRAL may differ)."""
  if not recorded:
    return  # written before checkpoints stored their config: nothing to compare
  diff = config_validation.differences(recorded, _config_json(config),
                                       config_validation.RESUME_NEUTRAL)
  if diff:
    raise ResumeConfigError(
        f"{workdir} holds a run of another config (checkpoint step {step}); this config differs "
        "in\n  " + "\n  ".join(diff) + "\nRerun with the run's own config (its config.json), or "
        "use another --workdir for this config.")


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  return dict(restored["meta"] or {})


def _abstract(state: TrainState) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(mngr: ocp.CheckpointManager, state: TrainState,
            step: int | None = None) -> tuple[TrainState, dict]:
  """Checkpoint `step` (default: the latest) into `state`'s shardings, whatever it was saved with,
  and its meta. No fallback: training resumes through `restore_latest`."""
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(state)), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})


def check_latest_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """check_resume_config against the workdir's latest checkpoint, if any, before any expensive
  start-up work and without creating anything (an unreadable meta is left to `restore_latest`)."""
  if not _orbax_dir(workdir).is_dir():
    return
  mngr = _read_only_manager(_orbax_dir(workdir))
  try:
    step = mngr.latest_step()
    if step is None:
      return
    try:
      meta = read_meta(mngr, step)
    except Exception:  # pylint: disable=broad-except  (restore_latest reports it)
      return
    check_resume_config(meta.get("config"), config, workdir, step)
  finally:
    mngr.close()


def _drop_abandoned_reads() -> None:
  """After a failed restore, reads that orbax had in flight still complete and call back into the
  asyncio loop it has closed; Python prints each as an unraisable "Event loop is closed" error.
  They carry no information (the failure was reported), so the hook drops exactly those."""
  previous = sys.unraisablehook
  if getattr(previous, "_eees_drops_abandoned_reads", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)

  hook._eees_drops_abandoned_reads = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _move_aside(mngr: ocp.CheckpointManager, workdir: str, step: int) -> str:
  """Moves checkpoint `step` to <workdir>/corrupt_checkpoints/<step>[.n] (process 0); all
  processes then re-read the checkpoint list."""
  src = _orbax_dir(workdir) / str(step)
  dst_root = path(workdir, CORRUPT)
  dst = dst_root / str(step)
  if jax.process_index() == 0:
    dst_root.mkdir(parents=True, exist_ok=True)
    n = 1
    while dst.exists():
      dst, n = dst_root / f"{step}.{n}", n + 1
    src.rename(dst)
  sharding.barrier(f"eees_move_aside_{step}")
  mngr.reload()
  return os.fspath(dst)


def restore_latest(mngr: ocp.CheckpointManager, state: TrainState, workdir: str,
                   config: ml_collections.ConfigDict) -> tuple[TrainState, dict] | None:
  """Restores the newest checkpoint that restores, into `state`'s shardings (whatever it was saved
  with); None when there is none.

  A checkpoint whose meta or state does not restore (a truncated array file, manifest or metadata)
  is moved to <workdir>/corrupt_checkpoints/ with a warning, and the previous one is tried; when
  none is left, WorkdirError names the folder. A checkpoint of another config raises
  ResumeConfigError before anything is restored.
  """
  abstract = _abstract(state)
  failures = []
  while mngr.latest_step() is not None:
    step = mngr.latest_step()
    error = None
    try:
      meta = read_meta(mngr, step)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      error = e
    if error is None:
      check_resume_config(meta.get("config"), config, workdir, step)
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
      except Exception as e:  # pylint: disable=broad-except
        error = e
    if not sharding.any_process(error is not None):
      return restored["state"], meta
    _drop_abandoned_reads()
    reason = _reason(error) if error is not None else "unreadable on another process"
    moved = _move_aside(mngr, workdir, step)
    message = (f"checkpoint step {step} in {_orbax_dir(workdir)} does not restore ({reason}); "
               f"moved it to {moved} and trying the previous checkpoint")
    print(f"WARNING: {message}", flush=True)
    failures.append((message, reason))
  if failures:
    raise WorkdirError(
        f"no checkpoint in {_orbax_dir(workdir)} restores (each was moved to "
        f"{path(workdir, CORRUPT)}): " + "; ".join(f"{r}" for _, r in failures)
        + ". Delete the workdir to start over, or restore the folder from a backup.")
  return None


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


def _tokenizer_files(spec: str) -> list[epath.Path]:
  if epath.Path(spec).is_dir():
    return [epath.Path(spec) / "vocab.json", epath.Path(spec) / "merges.txt"]
  return [epath.Path(spec)]


def _record_tokenizer(workdir: str, spec: str | None, write: bool) -> dict:
  """'clip' (the vocabulary of the clip-anytorch package) as is; a tokenizer given as files is
  copied into <workdir>/tokenizer/<hash>/ so the workdir does not depend on them."""
  if spec in (None, "", "clip"):
    return {"kind": "clip"}
  files = _tokenizer_files(spec)
  missing = [os.fspath(f) for f in files if not f.is_file()]
  if missing:
    raise config_validation.ConfigError([
        f"text.tokenizer = {spec!r}: missing {', '.join(missing)}; 'clip', or a Hugging Face "
        "tokenizer folder with vocab.json and merges.txt"])
  contents = [_read_bytes(f) for f in files]
  digest = _sha256(b"".join(_sha256(c).encode() for c in contents))[:16]
  folder = os.path.join(TOKENIZER, digest)
  if write:
    for f, c in zip(files, contents):
      target = path(workdir, folder, f.name)
      if not _exists(target):
        _write_atomic(target, c)
  where = folder if epath.Path(spec).is_dir() else os.path.join(folder, files[0].name)
  return {"kind": "files", "path": where, "source": spec}


def _record_text_tower(workdir: str, text_params: Any | None, write: bool) -> dict:
  """A frozen tower's parameters go once into <workdir>/text_tower/<hash>.msgpack."""
  if text_params is None:
    return {"source": "state"}
  data = flax.serialization.msgpack_serialize(
      {"params": jax.tree.map(np.asarray, flax.core.unfreeze(text_params))})
  digest = _sha256(data)
  where = os.path.join(TEXT_TOWER, f"{digest[:16]}.msgpack")
  if write and not _exists(path(workdir, where)):
    _write_atomic(path(workdir, where), data)
  return {"source": "file", "path": where, "sha256": digest}


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


def _read_only_manager(folder: epath.Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_drop_read_only_notice)  # orbax warns that it was asked to only read
  try:
    return ocp.CheckpointManager(folder, options=options, item_names=("state", "meta"))
  finally:
    absl_logger.removeFilter(_drop_read_only_notice)


def open_read_only(workdir: str) -> ocp.CheckpointManager:
  """A manager that only reads <workdir>/checkpoints; WorkdirError when it holds no checkpoint."""
  folder = _orbax_dir(workdir)
  hint = (f"train a model there first (python -m eees_jax.main --config=... --workdir={workdir})")
  if not path(workdir).is_dir():
    raise WorkdirError(f"workdir {workdir} does not exist; {hint}")
  if not folder.is_dir():
    raise WorkdirError(f"workdir {workdir} holds no checkpoints (no {folder}); {hint}")
  mngr = _read_only_manager(folder)
  if not mngr.all_steps():
    mngr.close()
    raise WorkdirError(f"workdir {workdir} holds no finished checkpoint in {folder}; {hint}")
  return mngr


def select_step(mngr: ocp.CheckpointManager, step: str | int, workdir: str) -> int:
  """'latest', 'best' (by the run's config.eval.best_metric among the checkpoints evaluated on its
  validation split) or a step."""
  steps = sorted(mngr.all_steps())
  if step == "latest":
    return steps[-1]
  if step == "best":
    config = read_meta(mngr, steps[-1]).get("config") or {}
    if not config.get("dataset", {}).get("holdout", False):
      raise WorkdirError(
          f"{workdir} is a run without a validation split (config.dataset.holdout=False), so it "
          "keeps no best checkpoint: choosing one by test metrics would select on the test "
          f"identities. Use step='latest' or one of the steps {steps}")
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
  where = path(workdir, entry["path"])
  if not _exists(where):
    raise WorkdirError(f"{where} is missing: the frozen text tower of this model; the workdir is "
                       "incomplete (copy the whole workdir, not only checkpoints/)")
  data = _read_bytes(where)
  if _sha256(data) != entry["sha256"]:
    raise WorkdirError(f"{where} is corrupt: its SHA-256 differs from the one its checkpoint "
                       "recorded")
  return flax.serialization.msgpack_restore(data)["params"]


def tokenizer_spec(workdir: str, record: dict) -> str:
  """The argument for tokenizer.build_tokenizer that the model record names."""
  entry = record["tokenizer"]
  if entry["kind"] == "clip":
    return "clip"
  where = path(workdir, entry["path"])
  if not _exists(where):
    raise WorkdirError(f"{where} is missing: the tokenizer files of this model")
  return os.fspath(where)
