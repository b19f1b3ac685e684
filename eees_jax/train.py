"""EEES training: the pure train step, the loop, and (for now) the evaluation calls.

One jit-compiled step over a device mesh: the global batch is sharded on the "data" axis, the state
is replicated (or, with config.mesh.fsdp, its large parameters and Adam moments are split over the
same axis), and the old state's buffers are donated. Data order, augmentation and the RNG depend
only on (config.seed, step), so a run restarted from its last checkpoint replays exactly the batches
it would have seen, and ends with the same parameters as an uninterrupted run.

The model, train state, optimiser and training data come from eees_jax/experiment.py, checkpoints and
the workdir's model record from eees_jax/checkpoints.py, test-time features from
eees_jax/embedding.py. TensorFlow (tf.data) is imported only where input is built, so the step, the
state and the checkpoints load on hosts without it (the GPU benchmark machine has none).
"""
from __future__ import annotations

import functools
import os
import signal
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from data_pipelines.ops import CLIP_MEAN, CLIP_STD, normalize
from eees_jax import checkpoints, embedding, losses, sharding
from eees_jax.experiment import Experiment, TrainState, build_experiment, init_experiment_state


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite; nothing was saved from that step on."""


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
# Evaluation.
# ----------------------------------------------------------------------------------------------

def make_extract(exp: Experiment, state: TrainState) -> Callable:
  """extract(records) -> test-time features [n, D] of the state's model (embedding.record_extractor)."""
  cfg = exp.config
  variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
  return embedding.record_extractor(exp.model, variables, exp.mesh, root=cfg.dataset.root,
                                    height=cfg.input.height, width=cfg.input.width,
                                    batch_size=cfg.input.eval_batch_size, flip=cfg.eval.flip)


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
  checkpoints.write_config(workdir, config)
  exp, pretrained = build_experiment(config, workdir)
  mesh = exp.mesh
  rep = sharding.replicated(mesh)
  # What rebuilds the model from the workdir alone (inference.load): in every checkpoint's meta.
  record = checkpoints.write_model_record(workdir, config, exp.spec, exp.text_params)

  # Initialised eagerly (pretrained tensors must not become jit constants), then placed: replicated,
  # or with config.mesh.fsdp the large parameters and their Adam moments split over the devices.
  state = init_experiment_state(exp, pretrained)
  state_sh = sharding.state_shardings(state, mesh, config.mesh.fsdp, config.mesh.fsdp_min_size)
  state = jax.device_put(state, state_sh)
  del pretrained
  mngr = checkpoints.manager(workdir, config)
  meta = {}
  if mngr.latest_step() is not None:
    state, meta = checkpoints.restore(mngr, state)
    print(f"Resumed from step {int(state.step)} in {workdir}", flush=True)
  meta.update(checkpoints.checkpoint_meta(config, record))
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
          checkpoints.save(mngr, state, meta, eval_metrics)
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
    checkpoints.save(mngr, state, meta, final)
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
