"""EEES training: the pure train step, the loop, and the evaluation calls.

One jit-compiled step over a device mesh: the global batch is sharded on the "data" axis, the state
is replicated (or, with config.mesh.fsdp, its large parameters and Adam moments are split over the
same axis), and the old state's buffers are donated. Data order, augmentation and the RNG depend
only on (config.seed, step), so a run restarted from its last checkpoint replays exactly the batches
it would have seen, and ends with the same parameters as an uninterrupted run.

Nothing is lost on a crash or a preemption: the final state is saved before the final evaluation,
and a SIGTERM at any moment saves what there is to save and raises Preempted (`eees_jax.main`
exits with PREEMPTED_EXIT_CODE, so a scheduler requeues the job). On a multi-host run every process
stops at the same step: each step carries the processes' SIGTERM flags into the jitted step, whose
max comes back with the step's metrics (no extra synchronisation).

The model, train state, optimiser and training data come from eees_jax/experiment.py, checkpoints and
the workdir's model record from eees_jax/checkpoints.py, test-time features from
eees_jax/embedding.py. TensorFlow (tf.data) is imported only where input is built, so the step, the
state and the checkpoints load on hosts without it (the GPU benchmark machine has none).
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from data_pipelines import registry
from data_pipelines.ops import CLIP_MEAN, CLIP_STD, normalize
from data_pipelines.records import VISIBLE, DatasetError, ImageRecord
from eees_jax import checkpoints, config_validation, embedding, losses, sharding, summaries, xla_cpu
from eees_jax.experiment import Experiment, TrainState, build_experiment, init_experiment_state
from eees_jax.models import eees as eees_lib
from eees_jax.models import tokenizer as tokenizer_lib

# The exit code of a run stopped by SIGTERM after saving (EX_TEMPFAIL: "try again later"): requeue.
PREEMPTED_EXIT_CODE = 75


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite; nothing was saved from that step on."""


class Preempted(Exception):
  """SIGTERM: the run saved what there was to save and stopped; the same command resumes it."""


# ----------------------------------------------------------------------------------------------
# The pure train step.
# ----------------------------------------------------------------------------------------------

def train_step(state: TrainState, batch: dict[str, jax.Array], text: dict[str, jax.Array], *,
               model: nn.Module, text_model: nn.Module | None, tx: optax.GradientTransformation,
               loss_cfg: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch.

  batch: images uint8 [N, H, W, 3], labels/modality/desc int32 [N] (N = 3PK, views V, Vc, R);
    optional stop int32 [N]: each process's SIGTERM flag on its rows (metrics "stop" = their max).
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
  if "stop" in batch:  # any process's SIGTERM flag, the same on every process (see module doc)
    metrics["stop"] = jnp.max(batch["stop"])
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, rng=jax.random.fold_in(state.rng, state.step))
  return new_state, metrics


# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------

def make_extract(exp: Experiment, state: TrainState, *, progress: bool = False,
                 before_batch=None) -> embedding.RecordExtractor:
  """extract(records) -> test-time features [n, D] of the state's model, reading the test images
  from the configured source (a folder or prepared TFDS splits)."""
  cfg = exp.config
  variables = {"params": state.params["model"], "batch_stats": state.batch_stats}
  return embedding.RecordExtractor(
      exp.model, variables, exp.mesh, images=registry.eval_images(cfg.dataset),
      height=cfg.input.height, width=cfg.input.width, batch_size=cfg.input.eval_batch_size,
      flip=cfg.eval.flip, threads=cfg.input.threads or None, progress=progress,
      before_batch=before_batch)


def eval_captions(config: ml_collections.ConfigDict, records: list[ImageRecord]) -> dict[str, str]:
  """Image path -> description of every visible test record: the text queries of the text-to-person
  rows (config.eval.text_retrieval). DatasetError naming the images that have none."""
  # pylint: disable=g-import-not-at-top (the description reader: only with text retrieval on)
  from data_pipelines import datasets, descriptions as descriptions_lib
  visible = [r for r in records if r.modality == VISIBLE]
  try:
    texts = descriptions_lib.load_descriptions(datasets.descriptions_path(config.dataset), visible,
                                               field=config.dataset.description_field)
  except DatasetError as e:
    raise DatasetError(
        f"config.eval.text_retrieval=True scores held-out captions of the visible test images, "
        f"which needs a description of each: {e}\nDescribe the test images too (python -m "
        "eees_jax.describe --splits=train,test; docs/describe.md), or set "
        "--config.eval.text_retrieval=False.") from None
  return {r.path: t for r, t in zip(visible, texts)}


def _text_embedder(exp: Experiment, state: TrainState):
  """embed_text(sentences) -> unit text features [n, D] of the run's text tower (the trained one in
  the state, or the frozen one), tokenised as in training; runs on this process's first device."""
  cfg = exp.config
  params = state.params["text"] if exp.text_model is not None else exp.text_params
  # Gathered (it may be split over hosts with FSDP), then placed whole on one local device.
  params = jax.device_put(sharding.to_host(params), jax.local_devices()[0])
  tokenizer = tokenizer_lib.build_tokenizer(cfg.text.tokenizer,
                                            context_length=exp.spec.text["context_length"])
  tower = exp.text_tower

  def unit_text(p, tokens):
    return eees_lib.l2_normalize(tower.apply({"params": p}, tokens).astype(jnp.float32))

  def embed_text(sentences):
    return embedding.embed_tokens(unit_text, params, tokenizer.tokenize(list(sentences)),
                                  cfg.text.embed_batch_size, desc="embedding test captions")
  return embed_text


def text_retrieval_rows(exp: Experiment, state: TrainState, extract: embedding.RecordExtractor,
                        records: list[ImageRecord]) -> dict:
  """The text-to-person settings (eees_jax.evaluation.text_retrieval) of the state's model,
  labelled as extra report rows. Image joint features are the l2(v) block of the test-time
  features `extract` computes for the image protocol (no second pass over images already seen);
  every process must call it (extraction is a collective)."""
  from eees_jax.evaluation import text_retrieval  # pylint: disable=g-import-not-at-top
  cfg = exp.config
  joint_dim = int(exp.text_tower.embed_dim)

  def joint(recs):
    feats = extract(recs)  # [n, 2 (Df + Dv)] with flip: l2(BN f), l2(v), then the mirror's
    per_view = feats.shape[1] // 2 if cfg.eval.flip else feats.shape[1]
    return feats[:, per_view - joint_dim:per_view]

  results = text_retrieval.evaluate_text_retrieval(
      joint, _text_embedder(exp, state), records, eval_captions(cfg, records),
      modes=tuple(cfg.eval.modes), trials=cfg.eval.trials,
      dataset=registry.get(cfg.dataset.name).title)
  extra = ("" if cfg.eval.gallery_source == "random" else
           "The image rows draw their galleries from exp/rand_perm_cam.mat; these rows use the AGW "
           "draws.")
  return text_retrieval.report_section(results, cfg, extra)


def evaluate(exp: Experiment, state: TrainState, out_dir: str | None, *,
             records: list[ImageRecord] | None = None, before_batch=None,
             notes: str | None = None, text: bool = False) -> dict:
  """Runs the data set's protocol and, with `text`, the text-to-person settings (results
  ["text_retrieval"]); writes the report (JSON, markdown, plots, ranked list) into `out_dir`
  (process 0). Every process must call it: feature extraction is a collective.
  Prints how long feature extraction and scoring took."""
  from eees_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  cfg = exp.config
  is_main = jax.process_index() == 0
  extract = make_extract(exp, state, progress=is_main, before_batch=before_batch)
  start = time.perf_counter()
  records = registry.test_records(cfg) if records is None else records
  results = registry.evaluate(extract, cfg, progress=is_main, records=records)
  if text:
    results["text_retrieval"] = text_retrieval_rows(exp, state, extract, records)
  scoring = time.perf_counter() - start - extract.seconds
  if out_dir and is_main:
    report.write_report(results, out_dir, title=registry.report_title(cfg), notes=notes)
  if cfg.eval.ranked_list_queries > 0:
    sheet = os.fspath(checkpoints.path(out_dir, "ranked_list.png")) if out_dir and is_main else None
    registry.ranked_list(extract, cfg, sheet, records)
  if is_main:
    rate = extract.images / max(extract.seconds, 1e-9)
    tqdm.write(f"evaluation: features of {extract.images} images in {extract.seconds:.1f} s "
               f"({rate:.1f} images/s), scoring{' (text rows included)' if text else ''} in "
               f"{scoring:.1f} s")
  return results


def check_evaluation_inputs(config: ml_collections.ConfigDict) -> list[ImageRecord]:
  """What only evaluation would meet, checked before training: lists the test images, runs the
  protocol on placeholder features (empty query or gallery lists, missing protocol files) and
  decodes every test image as evaluation will (DatasetError naming unreadable ones). Returns the
  test records."""
  from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top (TensorFlow)
  records = registry.test_records(config)
  rng = np.random.default_rng(0)
  dry = config.copy_and_resolve_references()
  dry.eval.rerank.enabled = False  # the ranking rules are checked without its cost
  registry.evaluate(lambda recs: rng.standard_normal((len(recs), 8)).astype(np.float32), dry,
                    records=records)
  if config.eval.text_retrieval:  # every visible test image has a caption; the settings run
    from eees_jax.evaluation import text_retrieval  # pylint: disable=g-import-not-at-top
    placeholder = lambda items: rng.standard_normal((len(items), 8)).astype(np.float32)  # pylint: disable=unnecessary-lambda-assignment
    text_retrieval.evaluate_text_retrieval(placeholder, placeholder, records,
                                           eval_captions(config, records),
                                           modes=tuple(config.eval.modes), trials=1)
  batches = input_pipeline.eval_dataset(
      registry.eval_images(config.dataset), records, height=config.input.height,
      width=config.input.width, batch_size=256, threads=config.input.threads or None)
  for _ in tqdm(batches, total=-(-len(records) // 256), desc="checking test images", unit="batch",
                leave=False, disable=jax.process_index() != 0):
    pass
  return records


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------

class _Preemption:
  """Turns SIGTERM into a flag; `agreed()` tells every process whether any process has it."""

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
    if not self.requested:
      os.write(sys.stderr.fileno(), b"SIGTERM: saving at the next safe point, then exiting\n")
    self.requested = True

  def agreed(self) -> bool:
    """A collective on a multi-host run: call it on every process at the same point."""
    return sharding.any_process(self.requested)

  def check(self) -> None:
    if self.agreed():
      raise Preempted("SIGTERM")

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
  """Trains (resuming from `workdir` when it holds checkpoints), saves, evaluates, writes the report.

  Raises config_validation.ConfigError before any work for an invalid config, DatasetError /
  WorkdirError for bad inputs or a workdir of another run, NonFiniteLossError /
  checkpoints.NonFiniteStateError when training diverges, and Preempted after a SIGTERM (having
  saved what there was to save).
  """
  config_validation.validate(config)
  sharding.initialize_distributed()
  workdir = os.fspath(workdir)
  with _Preemption() as preemption:
    checkpoints.check_latest_config(workdir, config)  # before any expensive start-up work
    exp, pretrained = build_experiment(config, workdir)
    test_records = check_evaluation_inputs(config)
    mngr = checkpoints.manager(workdir, config)  # creates the checkpoint folder
    try:
      return _train_and_evaluate(config, workdir, mngr, preemption, exp, pretrained, test_records)
    finally:
      mngr.wait_until_finished()
      mngr.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mngr,
                        preemption: _Preemption, exp: Experiment, pretrained,
                        test_records: list[ImageRecord]) -> dict:
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
  meta = {}
  restored = checkpoints.restore_latest(mngr, state, workdir, config)
  if restored is not None:
    state, meta = restored
    print(f"Resumed from step {int(state.step)} in {workdir}", flush=True)
  meta.update(checkpoints.checkpoint_meta(config, record))
  checkpoints.write_config(workdir, config)  # the start passed every check
  start_step = int(jax.device_get(state.step))
  text = {k: jax.device_put(v, rep) for k, v in exp.text_arrays.items()}
  if preemption.agreed():
    raise Preempted(f"SIGTERM during start-up: nothing new to save (latest checkpoint: step "
                    f"{mngr.latest_step()}); rerun the same command to resume.")

  step_fn = jax.jit(functools.partial(train_step, model=exp.model, text_model=exp.text_model,
                                      tx=exp.tx, loss_cfg=config.loss),
                    in_shardings=(state_sh, sharding.batch_sharded(mesh), rep),
                    out_shardings=(state_sh, rep), donate_argnums=(0,),
                    compiler_options=xla_cpu.compiler_options())

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
  keeps_best = checkpoints.keeps_best(config)
  folder = checkpoints.path(workdir, checkpoints.CHECKPOINTS)
  writer = summaries.writer(os.fspath(checkpoints.path(workdir, "tensorboard"))) if is_main else None
  eval_every = config.train.eval_every_epochs * exp.steps_per_epoch
  ckpt_every = config.train.checkpoint_every_steps
  epoch_of = lambda step: (step - 1) // exp.steps_per_epoch + 1  # pylint: disable=unnecessary-lambda-assignment
  bar = tqdm(total=exp.total_steps, initial=start_step, unit="step", disable=not is_main,
             dynamic_ncols=True, desc="train")

  def save(step: int, metrics: dict | None = None) -> None:
    meta.update(step=step, epoch=epoch_of(step))
    checkpoints.save(mngr, state, meta, metrics if keeps_best else None)
    if writer:
      writer.flush()  # the logged scalars are as durable as the checkpoint

  def scalars(prefix: str, values: dict, step: int) -> None:
    if writer:
      for k, v in values.items():
        writer.add_scalar(f"{prefix}/{k}", float(v), step)

  pending = None  # (step, metrics) of the previous step, checked one step late (no device stall)
  last_log = (time.time(), start_step)
  try:
    for step in range(start_step + 1, exp.total_steps + 1):
      batch = next(batches)
      batch["stop"] = np.full(len(batch["labels"]), preemption.requested, np.int32)
      state, metrics = step_fn(state, sharding.host_batch_to_global(batch, mesh), text)
      stop = False
      if pending is not None:
        previous = jax.device_get(pending[1])
        _check_finite(previous, pending[0])
        stop = bool(previous["stop"])  # the same on every process
      pending = (step, metrics)
      bar.update(1)
      epoch = epoch_of(step)
      if step % config.train.log_every_steps == 0 or step == exp.total_steps:
        m = {k: v for k, v in jax.device_get(metrics).items() if k != "stop"}
        _check_finite(m, step)
        now = time.time()
        ips = (step - last_log[1]) * global_batch / max(now - last_log[0], 1e-9)
        last_log = (now, step)
        bar.set_postfix(epoch=epoch, img_s=f"{ips:.1f}", lr=f"{float(exp.schedule(step - 1)):.2e}",
                        **{k.split("/")[-1]: f"{float(v):.3f}" for k, v in m.items()
                           if k.startswith("loss/") and "_" not in k})
        scalars("train", dict(m, images_per_second=ips, lr=float(exp.schedule(step - 1))), step)
      eval_metrics = None
      if eval_every > 0 and step % eval_every == 0 and step != exp.total_steps and not stop:
        _check_finite(jax.device_get(metrics), step)
        try:
          res = evaluate(exp, state, os.fspath(checkpoints.path(workdir, "eval", f"step_{step:07d}")),
                         records=test_records, before_batch=preemption.check)
        except Preempted:
          save(step)
          mngr.wait_until_finished()
          raise Preempted(f"SIGTERM during the evaluation of step {step}: saved step {step} to "
                          f"{folder}; rerun the same command to resume.") from None
        bar.unpause()  # the training rate leaves the evaluation out
        eval_metrics = _summary_scalars(res)
        bar.write(f"step {step} (epoch {epoch}): " +
                  ", ".join(f"{k} {v:.2f}" for k, v in eval_metrics.items()))
        scalars("eval", eval_metrics, step)
      if eval_metrics is not None or (ckpt_every > 0 and step % ckpt_every == 0) or stop:
        _check_finite(jax.device_get(metrics), step)
        save(step, eval_metrics)
      if stop:
        mngr.wait_until_finished()
        raise Preempted(f"SIGTERM: saved step {step} to {folder}; rerun the same command to "
                        "resume.")
    if pending is not None:
      _check_finite(jax.device_get(pending[1]), pending[0])
    bar.close()  # before the evaluation: its rate is the training's alone
    # The final state first: a kill during the evaluation loses nothing.
    final_step = int(jax.device_get(state.step))
    save(final_step)
    mngr.wait_until_finished()
    if preemption.agreed():
      raise Preempted(f"SIGTERM: saved the final step {final_step} to {folder}; rerun the same "
                      "command to evaluate it.")
    try:
      results = evaluate(exp, state, os.fspath(checkpoints.path(workdir, "report")),
                         records=test_records, before_batch=preemption.check,
                         notes=checkpoints.selection_note(config),
                         text=bool(config.eval.text_retrieval))
    except Preempted:
      raise Preempted(f"SIGTERM during the final evaluation; the final step {final_step} was saved "
                      f"to {folder} before it: rerun the same command to evaluate it.") from None
    scalars("eval", _summary_scalars(results), final_step)
    if is_main:
      md = checkpoints.path(workdir, "report", "results.md")
      if md.exists():
        print(md.read_text())
    return results
  finally:
    bar.close()
    if writer:
      writer.close()
