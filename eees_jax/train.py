"""EEES training: the train state, the pure train step, the loop, evaluation, checkpoint and resume.

One jit-compiled step over a device mesh: the global batch is sharded on the "data" axis, the state
is replicated (or, with config.mesh.fsdp, its large parameters and Adam moments are split over the
same axis), and the old state's buffers are donated. Data order, augmentation and the RNG depend
only on (config.seed, step), so a run restarted from its last checkpoint replays exactly the batches
it would have seen, and ends with the same parameters as an uninterrupted run.

TensorFlow (tf.data) is imported only where input is built, so the step, the state and the
checkpoints load on hosts without it (the GPU benchmark machine has none).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers
from tqdm import tqdm

from data_pipelines import datasets, descriptions as descriptions_lib, sampler
from data_pipelines.ops import CLIP_MEAN, CLIP_STD, normalize
from data_pipelines.records import TrainSet
from eees_jax import losses, optim, sharding, text_features
from eees_jax.models import eees as eees_lib
from eees_jax.models import tokenizer as tokenizer_lib
from eees_jax.models import weights as weights_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # {"model": ..., "pair": ..., "text": ... (only when the text tower trains)}
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite; nothing was saved from that step on."""


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


# ----------------------------------------------------------------------------------------------
# The pure train step.
# ----------------------------------------------------------------------------------------------

def train_step(state: TrainState, batch: dict[str, jax.Array], text: dict[str, jax.Array], *,
               model: nn.Module, text_model: nn.Module | None, tx: optax.GradientTransformation,
               loss_cfg: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch.

  batch: images uint8 [N, H, W, 3], labels/modality/desc int32 [N] (N = 3PK, views V, Vc, R).
  text: "index" int32 [num_records] mapping a record to its distinct description, and either
    "features" float32 [U, D] (frozen tower) or "tokens" int32 [U, L] (trainable tower).
  """
  images = normalize(batch["images"], CLIP_MEAN, CLIP_STD)
  labels, modality = batch["labels"], batch["modality"]
  valid = jnp.ones(labels.shape, bool)
  text_idx = text["index"][batch["desc"]]

  def loss_fn(params):
    out, updates = model.apply({"params": params["model"], "batch_stats": state.batch_stats},
                               images, modality, train=True, mutable=["batch_stats"])
    if text_model is not None:
      t = text_model.apply({"params": params["text"]}, text["tokens"][text_idx])
    else:
      t = text["features"][text_idx]
    loss, metrics = losses.eees_loss(out, t.astype(jnp.float32), labels, modality, valid, loss_cfg,
                                     pair_params=params.get("pair"))
    return loss, (metrics, updates["batch_stats"])

  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.global_norm(grads))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, rng=jax.random.fold_in(state.rng, state.step))
  return new_state, metrics


# ----------------------------------------------------------------------------------------------
# Building an experiment from its config.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Experiment:
  """Everything a run needs besides the mutable state."""
  config: ml_collections.ConfigDict
  workdir: str
  train_set: TrainSet
  model: eees_lib.EEES
  text_model: nn.Module | None
  text_config: dict
  text_arrays: dict[str, np.ndarray]
  tx: optax.GradientTransformation
  schedule: Callable
  steps_per_epoch: int
  total_steps: int
  mesh: jax.sharding.Mesh


def _load_pretrained(config) -> weights_lib.CLIPWeights | None:
  path = config.model.init.checkpoint
  if not path:
    return None
  if "pretrain" in config and config.pretrain.enabled:
    from eees_jax import pretrain_clip
    pretrain_clip.ensure_pretrained(config)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config.model.init.checkpoint={path!r} does not exist. Download OpenAI's CLIP RN50 weights "
        "(RN50.pt) on a machine with internet access, convert them once with "
        "`python -m eees_jax.convert_clip RN50.pt weights/RN50` and pass "
        "--config.model.init.checkpoint=weights/RN50, or set it to '' to train from scratch.")
  return weights_lib.load_clip(path)


# Options that do not change a tower's parameters: they come from the experiment config even when
# the architecture comes from a checkpoint.
_VISION_RUNTIME_OPTIONS = {"resnet": ("last_stride", "interpolation", "num_modalities"),
                           "vit": ("patch_stride", "interpolation", "num_modalities")}


def tower_configs(config, pretrained: weights_lib.CLIPWeights | None) -> tuple[dict, dict]:
  """Vision and text tower configs: from the checkpoint for the towers it loads (so activation,
  epsilon, head count and end-of-text rule are the checkpoint's), else from config.model."""
  vision, text = config.model.vision.to_dict(), config.model.text.to_dict()
  load = tuple(config.model.init.load)
  if pretrained is not None and "vision" in load:
    kind = pretrained.vision_config["kind"]
    vision = {**pretrained.vision_config,
              **{k: vision[k] for k in _VISION_RUNTIME_OPTIONS[kind] if k in vision}}
  if pretrained is not None and "text" in load:
    text = dict(pretrained.text_config)
  return vision, text


def _variables(exp: Experiment, rng: jax.Array,
               pretrained: weights_lib.CLIPWeights | None = None) -> tuple[dict, dict]:
  """(params, batch_stats) of everything the optimiser sees; CLIP towers from `pretrained` where
  config.model.init.load says so. Under jax.eval_shape it gives the optimiser its tree structure."""
  cfg = exp.config
  k_model, k_pair, k_text, _ = jax.random.split(rng, 4)
  h, w = cfg.input.height, cfg.input.width
  variables = jax.jit(functools.partial(exp.model.init, train=False))(
      k_model, jnp.zeros((2, h, w, 3), jnp.float32), jnp.array([0, 1], jnp.int32))
  params = {"model": flax.core.unfreeze(variables["params"])}
  batch_stats = flax.core.unfreeze(variables.get("batch_stats", {}))
  if pretrained is not None and "vision" in tuple(cfg.model.init.load):
    params["model"]["encoder"] = weights_lib.merge_params(
        params["model"]["encoder"], pretrained.vision_params, include=(".*",), what="vision tower")
    if pretrained.vision_batch_stats:
      batch_stats["encoder"] = weights_lib.merge_params(
          batch_stats["encoder"], pretrained.vision_batch_stats, include=(".*",),
          what="vision batch statistics")
  pair = losses.init_pair_params(k_pair, cfg.loss.pair.kind, exp.text_config["embed_dim"],
                                 num_heads=cfg.loss.pair.num_heads)
  if pair:
    params["pair"] = pair
  if exp.text_model is not None:
    params["text"] = _text_params(cfg, exp.text_config, pretrained, k_text)
  return params, batch_stats


def init_state(exp: Experiment, pretrained: weights_lib.CLIPWeights | None) -> TrainState:
  """Fresh parameters (CLIP towers from `pretrained` where config.model.init.load says so)."""
  rng = jax.random.PRNGKey(exp.config.seed)
  params, batch_stats = _variables(exp, rng, pretrained)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=exp.tx.init(params), rng=jax.random.split(rng, 4)[3])


def _text_params(cfg, text_config: dict, pretrained, key):
  text_model = weights_lib.build_text_tower(text_config)
  tokens = jnp.zeros((1, text_config["context_length"]), jnp.int32)
  params = flax.core.unfreeze(jax.jit(text_model.init)(key, tokens)["params"])
  if pretrained is not None and "text" in tuple(cfg.model.init.load):
    params = weights_lib.merge_params(params, pretrained.text_params, include=(".*",), what="text tower")
  return params


def build_experiment(config: ml_collections.ConfigDict, workdir: str) -> tuple[Experiment, Any]:
  """Reads the data, tokenises the descriptions and builds model, optimiser and mesh."""
  train_set = datasets.load_train_set(config.dataset)
  texts = descriptions_lib.load_descriptions(datasets.descriptions_path(config.dataset),
                                             train_set.records, field=config.dataset.description_field)
  pretrained = _load_pretrained(config)
  vision_config, text_config = tower_configs(config, pretrained)
  tokenizer = tokenizer_lib.build_tokenizer(config.text.tokenizer,
                                            context_length=text_config["context_length"])
  tokens, index = text_features.unique_tokens(texts, tokenizer.tokenize)

  dtype = _dtype(config.model.dtype)
  model = eees_lib.EEES(vision=vision_config, num_classes=train_set.num_classes,
                        gem_p=config.model.gem_p, dtype=dtype)
  text_tower = weights_lib.build_text_tower(text_config)
  text_arrays = {"index": index}
  if config.text.trainable:
    text_model = text_tower
    text_arrays["tokens"] = tokens.astype(np.int32)
  else:
    text_model = None
    params = _text_params(config, text_config, pretrained, jax.random.PRNGKey(config.seed + 1))
    text_arrays["features"] = text_features.frozen_text_features(
        workdir, tokens, text_config, params,
        lambda p, t: text_tower.apply({"params": p}, t), config.text.embed_batch_size)

  P, K = config.input.P, config.input.K
  steps_per_epoch = sampler.steps_per_epoch(train_set, P, K)
  total_steps = steps_per_epoch * config.train.epochs
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)
  mesh = sharding.make_mesh(config.mesh.data)
  sharding.check_batch_divisible(3 * P * K, mesh, "training (3 * P * K)")
  sharding.check_batch_divisible(config.input.eval_batch_size, mesh, "config.input.eval_batch_size")

  # The optimiser needs the parameter tree's structure only.
  exp = Experiment(config=config, workdir=workdir, train_set=train_set, model=model,
                   text_model=text_model, text_config=text_config, text_arrays=text_arrays, tx=None, schedule=None,
                   steps_per_epoch=steps_per_epoch, total_steps=total_steps, mesh=mesh)
  abstract = jax.eval_shape(lambda: _variables(exp, jax.random.PRNGKey(0))[0])
  exp.tx, exp.schedule = optim.make_optimizer(abstract, config.optim, steps_per_epoch)
  return exp, pretrained


# ----------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------

def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  """Keeps the last `keep_checkpoints` checkpoints and the best one by `config.eval.best_metric`."""
  best = config.eval.best_metric
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=config.train.keep_checkpoints),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m[best], n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_names=("state", "meta"))


def save_checkpoint(mngr: ocp.CheckpointManager, state: TrainState, meta: dict,
                    metrics: dict | None = None) -> None:
  step = int(jax.device_get(state.step))
  if mngr.latest_step() == step:
    return
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)


def restore_checkpoint(mngr: ocp.CheckpointManager, state: TrainState) -> tuple[TrainState, dict]:
  """Restores the latest checkpoint into `state`'s shardings, whatever it was saved with."""
  step = mngr.latest_step()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"] or {})


# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------

def make_extract(exp: Experiment, state: TrainState) -> Callable:
  """extract(records) -> test-time features [n, D] (numpy), for the evaluation protocols.

  The variables keep the state's shardings (with FSDP, jit all-gathers the split ones inside
  `embed`, as in the train step).
  """
  cfg = exp.config
  mesh = exp.mesh
  variables = {"params": state.params["model"], "batch_stats": state.batch_stats}

  @jax.jit
  def embed(variables, images, modality):
    x = normalize(images, CLIP_MEAN, CLIP_STD)
    return exp.model.apply(variables, x, modality, flip=cfg.eval.flip, method=eees_lib.EEES.embed)

  cache: dict[str, np.ndarray] = {}  # path -> feature: protocols and the ranked list share passes

  def extract(records, root=None):
    root = root or cfg.dataset.root
    records = list(records)
    todo = [r for r in dict.fromkeys(records) if r.path not in cache]
    n_proc, proc = jax.process_count(), jax.process_index()
    share = cfg.input.eval_batch_size // n_proc
    done = 0
    from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top (see module doc)
    batches = input_pipeline.eval_dataset(root, todo, height=cfg.input.height, width=cfg.input.width,
                                          batch_size=cfg.input.eval_batch_size) if todo else ()
    for batch in batches:
      local = {k: batch[k][proc * share:(proc + 1) * share] for k in ("images", "modality")}
      g = sharding.host_batch_to_global(local, mesh)
      feats = np.asarray(sharding.to_host(embed(variables, g["images"], g["modality"])))
      feats = feats[np.asarray(batch["mask"])]
      for r, f in zip(todo[done:done + len(feats)], feats):
        cache[r.path] = f
      done += len(feats)
    return np.stack([cache[r.path] for r in records]) if records else np.zeros((0, 0), np.float32)

  return extract


def evaluate(exp: Experiment, state: TrainState, out_dir: str | None) -> dict:
  """Runs the data set's protocol; writes the report (JSON, markdown, plots) into `out_dir`."""
  from eees_jax.evaluation import protocols, report
  cfg = exp.config
  extract = make_extract(exp, state)
  name = cfg.dataset.name
  split = "val" if cfg.dataset.holdout else "test"
  if name in ("sysu", "synthetic"):
    results = protocols.evaluate_sysu(extract, cfg.dataset.root, modes=tuple(cfg.eval.modes),
                                      shots=tuple(cfg.eval.shots), trials=cfg.eval.trials, split=split)
  elif name == "regdb":
    results = protocols.evaluate_regdb(lambda split: extract, cfg.dataset.root, splits=(cfg.dataset.split,))
  elif name == "llcm":
    results = protocols.evaluate_llcm(extract, cfg.dataset.root, trials=cfg.eval.trials)
  else:
    raise ValueError(f"no evaluation protocol for config.dataset.name={name!r}")
  if out_dir and jax.process_index() == 0:
    title = f"EEES on {name}" + (" (held-out val ids, not a test result)" if split == "val" else "")
    report.write_report(results, out_dir, title=title)
    if name in ("sysu", "synthetic") and cfg.eval.ranked_list_queries > 0:
      _ranked_list(extract, cfg, out_dir, split)
  return results


def _ranked_list(extract: Callable, cfg, out_dir: str, split: str) -> None:
  """Ranked-list sheet of all-search trial 0 (features come from the extract's cache)."""
  from data_pipelines import sysu_mm01
  from eees_jax.evaluation import metrics, report
  query = sysu_mm01.query_set(cfg.dataset.root, "all", split=split)
  gallery = sysu_mm01.gallery_set(cfg.dataset.root, "all", 0, split=split)
  dist = metrics.cosine_distance(extract(query), extract(gallery))
  step = max(len(query) // cfg.eval.ranked_list_queries, 1)
  report.ranked_list_sheet(dist, query, gallery, cfg.dataset.root,
                           os.path.join(out_dir, "ranked_list.png"),
                           num_queries=cfg.eval.ranked_list_queries,
                           query_indices=list(range(0, len(query), step))[:cfg.eval.ranked_list_queries],
                           protocol="sysu")


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------

class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (it saves, then exits)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some test runners): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(metrics: dict, step: int) -> None:
  bad = [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
  if bad:
    raise NonFiniteLossError(
        f"non-finite value of {', '.join(sorted(bad))} at step {step}; the run stopped and no "
        "checkpoint from this step on was written. Lower config.optim.lr or enable "
        "config.optim.grad_clip, then restart from the last checkpoint with the same --workdir.")


def _summary_scalars(results: dict) -> dict[str, float]:
  """Flat {name: value} of the headline numbers of a protocol's results."""
  from eees_jax.evaluation import protocols
  return {k: float(v) for k, v in protocols.headline(results).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` when it holds checkpoints), evaluates, writes the report."""
  sharding.initialize_distributed()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  exp, pretrained = build_experiment(config, workdir)
  mesh = exp.mesh
  rep = sharding.replicated(mesh)

  # Initialised eagerly (pretrained tensors must not become jit constants), then placed: replicated,
  # or with config.mesh.fsdp the large parameters and their Adam moments split over the devices.
  state = init_state(exp, pretrained)
  state_sh = sharding.state_shardings(state, mesh, config.mesh.fsdp, config.mesh.fsdp_min_size)
  state = jax.device_put(state, state_sh)
  del pretrained
  mngr = checkpoint_manager(workdir, config)
  meta = {}
  if mngr.latest_step() is not None:
    state, meta = restore_checkpoint(mngr, state)
    print(f"Resumed from step {int(state.step)} in {workdir}", flush=True)
  start_step = int(jax.device_get(state.step))
  text = {k: jax.device_put(v, rep) for k, v in exp.text_arrays.items()}

  step_fn = jax.jit(functools.partial(train_step, model=exp.model, text_model=exp.text_model,
                                      tx=exp.tx, loss_cfg=config.loss),
                    in_shardings=(state_sh, sharding.batch_sharded(mesh), rep),
                    out_shardings=(state_sh, rep), donate_argnums=(0,))

  P, K = config.input.P, config.input.K
  global_batch = 3 * P * K
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
  batches = input_pipeline.train_dataset(
      exp.train_set, P=P, K=K, height=config.input.height, width=config.input.width,
      seed=config.seed, start_step=start_step, num_steps=exp.total_steps - start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      aug=config.input.aug, threads=config.input.threads or None,
      cache_decoded=config.input.cache_decoded)

  is_main = jax.process_index() == 0
  writer = None
  if is_main:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  eval_every = config.train.eval_every_epochs * exp.steps_per_epoch
  ckpt_every = config.train.checkpoint_every_steps
  bar = tqdm(total=exp.total_steps, initial=start_step, unit="step", disable=not is_main,
             dynamic_ncols=True, desc="train")
  pending = None  # (step, metrics) of the previous step, checked one step late (no device stall)
  last_log = (time.time(), start_step)
  results = None
  step = start_step
  try:
    with _Preemption() as preemption:
      for step in range(start_step + 1, exp.total_steps + 1):
        batch = next(batches)
        state, metrics = step_fn(state, sharding.host_batch_to_global(batch, mesh), text)
        if pending is not None:
          _check_finite(jax.device_get(pending[1]), pending[0])
        pending = (step, metrics)
        bar.update(1)
        epoch = (step - 1) // exp.steps_per_epoch + 1
        if step % config.train.log_every_steps == 0 or step == exp.total_steps:
          m = jax.device_get(metrics)
          _check_finite(m, step)
          now = time.time()
          ips = (step - last_log[1]) * global_batch / max(now - last_log[0], 1e-9)
          last_log = (now, step)
          bar.set_postfix(epoch=epoch, img_s=f"{ips:.1f}", lr=f"{float(exp.schedule(step - 1)):.2e}",
                          **{k.split("/")[-1]: f"{float(v):.3f}" for k, v in m.items()
                             if k.startswith("loss/") and "_" not in k})
          if writer:
            for k, v in m.items():
              writer.add_scalar(f"train/{k}", float(v), step)
            writer.add_scalar("train/images_per_second", ips, step)
            writer.add_scalar("train/lr", float(exp.schedule(step - 1)), step)
        eval_metrics = None
        if eval_every > 0 and step % eval_every == 0 and step != exp.total_steps:
          _check_finite(jax.device_get(metrics), step)
          res = evaluate(exp, state, os.path.join(workdir, "eval", f"step_{step:07d}"))
          eval_metrics = _summary_scalars(res)
          bar.write(f"step {step} (epoch {epoch}): " +
                    ", ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items()))
          if writer:
            for k, v in eval_metrics.items():
              writer.add_scalar(f"eval/{k}", v, step)
        if eval_metrics is not None or (ckpt_every > 0 and step % ckpt_every == 0) \
            or preemption.requested:
          _check_finite(jax.device_get(metrics), step)
          meta.update(step=step, epoch=epoch)
          save_checkpoint(mngr, state, meta, eval_metrics)
        if preemption.requested:
          mngr.wait_until_finished()
          bar.write(f"SIGTERM: saved step {step} to {workdir}/checkpoints; rerun the same command "
                    "to resume.")
          return {"preempted_at_step": step}
    if pending is not None:
      _check_finite(jax.device_get(pending[1]), pending[0])
    results = evaluate(exp, state, os.path.join(workdir, "report"))
    final = _summary_scalars(results)
    meta.update(step=int(jax.device_get(state.step)), final=final)
    save_checkpoint(mngr, state, meta, final)
    mngr.wait_until_finished()
    if writer:
      for k, v in final.items():
        writer.add_scalar(f"eval/{k}", v, int(jax.device_get(state.step)))
    if is_main:
      md_path = os.path.join(workdir, "report", "results.md")
      if os.path.exists(md_path):
        print(open(md_path).read())
    return results
  finally:
    bar.close()
    if writer:
      writer.close()
    mngr.wait_until_finished()
    mngr.close()
