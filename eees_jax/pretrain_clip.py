"""CLIP-style pretraining of a small image + text model, for the synthetic benchmark (SPEC section 6).

EEES on real data starts from OpenAI's CLIP: image and text towers pretrained together on
image-caption pairs, the text tower then frozen. The synthetic benchmark reproduces that regime:
this module trains the towers of `config.model` with CLIP's symmetric contrastive objective on
captioned synthetic images of OTHER people (a pretraining set generated with its own seed, none of
whose identities is in the benchmark), and writes them in the converted-CLIP format that
`--config.model.init.checkpoint` reads, a single stem stacked for both modalities exactly as
`eees_jax.convert_clip` stacks OpenAI's.

What web-scale pretraining gives real CLIP, reading clothes and body shape in any lighting, a few
CPU minutes of contrastive learning do not (docs/synthetic_benchmark.md, "How the synthetic config
was tuned"): `pretrain.attribute_weight` adds a cross-entropy per shape attribute of the pretraining
identities (`attribute_loss`, from a linear head that is not written out), and
`pretrain.map_attribute_weight` the same on the last feature map GeM-pooled as EEES's f pools it
(real CLIP RN50's pooled map is informative; without the term this small CLIP's is at chance).
`pretrain.modality_stems` trains one stem per modality from the start instead of one shared stem
(off by default: on real data EEES starts both stems from CLIP's one). `pretrain.visible_only` (on
in configs/synthetic.py) trains on the pretraining set's visible images alone, as real CLIP never
saw an infrared image. `pretrain.input_size` pretrains at a size of its own (64x32 in
configs/synthetic.py, which fine-tunes at 96x48), as real CLIP is pretrained at 224x224.

  python -m eees_jax.pretrain_clip --config=configs/synthetic.py [--config.pretrain.steps=600]

writes `config.model.init.checkpoint` from `config.pretrain`; `make demo` does the same on first use
(`ensure_pretrained`) and reuses the result afterwards, refusing one made with other settings.
Deterministic for a seed on one platform.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from data_pipelines.ops import CLIP_MEAN, CLIP_STD, normalize
from data_pipelines.records import VISIBLE, ImageRecord
from eees_jax.models import tokenizer as tokenizer_lib
from eees_jax import weights as weights_lib
from eees_jax.models import eees as eees_lib
from eees_jax.models import towers

RECORD_KEY = "pretraining"  # where the settings go in the checkpoint's config.json


class PretrainError(ValueError):
  """A pretrained checkpoint that does not match the config that should have produced it."""


def settings(config: ml_collections.ConfigDict) -> dict:
  """Everything that determines the pretrained weights: compared before a checkpoint is reused."""
  p = config.pretrain
  out = {k: v for k, v in p.to_dict().items() if k not in ("enabled", "input_size")}
  out["vision"] = _vision_architecture(config)
  out["text"] = config.model.text.to_dict()
  out["tokenizer"] = config.text.tokenizer
  out["input"] = list(input_size(config))  # the size pretrained at, however it was set
  if p.map_attribute_weight:  # the exponent of the pooled map the term reads
    out["gem_p"] = config.model.gem_p
  if not out.get("visible_only", False):  # recorded only when on: older checkpoints stay valid
    out.pop("visible_only", None)
  return json.loads(json.dumps(out))  # tuples -> lists, as they come back from JSON


def input_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(height, width) the towers are pretrained at: pretrain.input_size, or config.input's size
  when that is empty. Real CLIP is pretrained at its own resolution (224 x 224) and fine-tuned at
  the ReID one; the synthetic benchmark does the same, at a lower cost of its CPU minutes."""
  size = tuple(config.pretrain.get("input_size", ()) or ())
  if not size:
    return int(config.input.height), int(config.input.width)
  if (len(size) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                for x in size)):
    raise PretrainError(f"config.pretrain.input_size={size!r} must be (height, width), two "
                        "positive integers, or () for config.input's size")
  return size


def _vision_architecture(config) -> dict:
  """The pretraining image tower: config.model.vision with one stem (CLIP has one), or one per
  modality with pretrain.modality_stems."""
  stems = config.model.vision.num_modalities if config.pretrain.modality_stems else 1
  return {**config.model.vision.to_dict(), "num_modalities": stems}


# ----------------------------------------------------------------------------------------------
# The pure pieces: augmentation, loss, step.
# ----------------------------------------------------------------------------------------------

def augment(key: jax.Array, images: jax.Array, pad: int, flip: float) -> jax.Array:
  """Zero-pad by `pad`, random crop back, random horizontal flip. images: uint8 [B, H, W, 3]."""
  b, h, w, _ = images.shape
  k_y, k_x, k_f = jax.random.split(key, 3)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ys = jax.random.randint(k_y, (b,), 0, 2 * pad + 1)
  xs = jax.random.randint(k_x, (b,), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, 3)))(padded, ys, xs)
  flips = jax.random.uniform(k_f, (b,)) < flip
  return jnp.where(flips[:, None, None, None], crop[:, :, ::-1], crop)


def clip_loss(image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """CLIP's symmetric InfoNCE. features: [B, D] (unnormalised); the i-th image and text are a pair.

  Returns (loss, image->text top-1 accuracy in the batch).
  """
  img = image_features / jnp.linalg.norm(image_features, axis=-1, keepdims=True)
  txt = text_features / jnp.linalg.norm(text_features, axis=-1, keepdims=True)
  logits = jnp.exp(logit_scale) * jnp.matmul(img, txt.T, precision=jax.lax.Precision.HIGHEST)
  labels = jnp.arange(logits.shape[0])
  loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
          + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2
  return loss, jnp.mean(jnp.argmax(logits, axis=1) == labels)


@flax.struct.dataclass
class State:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def attribute_loss(features: jax.Array, head: dict, labels: jax.Array, sizes: tuple[int, ...]
                   ) -> jax.Array:
  """Mean over attributes of each attribute's softmax cross-entropy, from one linear head.

  features: [B, D]; head: {"w": [D, sum(sizes)], "b": [sum(sizes)]}; labels: int32 [B, A], the value
  index of each of the A attributes, whose k-th has sizes[k] values (columns in that order).
  """
  chex.assert_rank(features, 2)
  chex.assert_shape(labels, (features.shape[0], len(sizes)))
  logits = features @ head["w"] + head["b"]
  bounds = np.cumsum((0,) + tuple(sizes))
  losses = [optax.softmax_cross_entropy_with_integer_labels(logits[:, bounds[k]:bounds[k + 1]],
                                                            labels[:, k]).mean()
            for k in range(len(sizes))]
  return sum(losses) / len(sizes)


def train_step(state: State, images: jax.Array, tokens: jax.Array, labels: jax.Array,
               modality: jax.Array, key: jax.Array, *, vision, text, tx, pad: int, flip: float,
               attribute_weight: float = 0.0, sizes: tuple[int, ...] = (), stems: int = 1,
               map_attribute_weight: float = 0.0, gem_p: float = 3.0) -> tuple[State, dict]:
  """One step on uint8 images [B, H, W, 3], their tokens [B, L], attribute labels [B, A] and
  modalities [B] (used with one stem per modality, `stems` > 1): the contrastive loss, plus
  `attribute_weight` times `attribute_loss` of the pooled output, plus `map_attribute_weight` times
  `attribute_loss` of the last feature map GeM-pooled at exponent `gem_p` (EEES's f at its start),
  each when its weight is not 0."""
  x = normalize(augment(key, images, pad, flip), CLIP_MEAN, CLIP_STD)

  def loss_fn(params):
    out, updates = vision.apply({"params": params["vision"], "batch_stats": state.batch_stats}, x,
                                modality if stems > 1 else None, train=True,
                                mutable=["batch_stats"])
    t = text.apply({"params": params["text"]}, tokens)
    pooled = out["pooled"].astype(jnp.float32)
    contrastive, acc = clip_loss(pooled, t.astype(jnp.float32), params["logit_scale"])
    attributes = (attribute_loss(pooled, params["attribute_head"], labels, sizes)
                  if attribute_weight else jnp.zeros(()))
    map_attributes = (attribute_loss(eees_lib.gem_pool(out["map"], gem_p),
                                     params["map_attribute_head"], labels, sizes)
                      if map_attribute_weight else jnp.zeros(()))
    total = contrastive + attribute_weight * attributes + map_attribute_weight * map_attributes
    return total, (acc, contrastive, attributes, map_attributes, updates["batch_stats"])

  (loss, (acc, contrastive, attributes, map_attributes, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # CLIP clamps the temperature at 100.
  params["logit_scale"] = jnp.minimum(params["logit_scale"], jnp.log(100.0))
  return (state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                        opt_state=opt_state),
          {"loss": loss, "contrastive": contrastive, "attributes": attributes,
           "map_attributes": map_attributes, "accuracy": acc,
           "scale": jnp.exp(params["logit_scale"])})


# ----------------------------------------------------------------------------------------------
# Data, the loop and the output.
# ----------------------------------------------------------------------------------------------

def _pretraining_data(config) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...],
                                        np.ndarray]:
  """(uint8 images [n, H, W, 3], tokens [n, L], attribute labels [n, A], values per attribute,
  modality [n]) of every image of the pretraining set; the attributes are the shape cues both
  modalities show."""
  from data_pipelines import datasets, descriptions as descriptions_lib, input_pipeline
  p = config.pretrain
  datasets.ensure_synthetic(ml_collections.ConfigDict(dict(root=p.data.root,
                                                           generate=p.data.generate)))
  from data_pipelines import synthetic, sysu_mm01
  from data_pipelines.synthetic import labels as labels_lib
  captions = descriptions_lib.read_records(os.path.join(p.data.root, synthetic.DESCRIPTIONS))
  records = [ImageRecord(path, 0, int(path[3]), sysu_mm01.camera_modality(int(path[3])))
             for path in sorted(captions)]
  if p.get("visible_only", False):   # as real CLIP, which never saw an infrared image
    records = [r for r in records if r.modality == VISIBLE]
  paths = [r.path for r in records]
  height, width = input_size(config)
  images = input_pipeline.decode_images(p.data.root, records, height=height, width=width)
  tokenizer = tokenizer_lib.build_tokenizer(config.text.tokenizer,
                                            context_length=config.model.text.context_length)
  tokens = tokenizer.tokenize([captions[path]["description"] for path in paths])
  table, values = labels_lib.attribute_table(p.data.root)
  attribute_labels = np.array([table[labels_lib.pid_of(path)] for path in paths], np.int32)
  modality = np.array([r.modality for r in records], np.int32)
  return (images, tokens.astype(np.int32), attribute_labels, tuple(len(v) for v in values),
          modality)


def _schedule(p) -> optax.Schedule:
  warmup = max(int(round(p.warmup_fraction * p.steps)), 1)
  return optax.warmup_cosine_decay_schedule(p.lr * 0.01, p.lr, warmup, p.steps, end_value=0.0)


def pretrain(config: ml_collections.ConfigDict, out: str) -> dict:
  """Trains the towers of `config.model` (contrastive loss, plus the attribute term when
  pretrain.attribute_weight > 0) and writes them to `out` (converted format).

  Returns {"seconds", "final_loss" (contrastive), "final_attribute_loss" (0 unless
  pretrain.attribute_weight), "final_map_attribute_loss" (0 unless pretrain.map_attribute_weight),
  "final_accuracy", "images"}.
  """
  p = config.pretrain
  for name in ("attribute_weight", "map_attribute_weight"):
    if p[name] < 0:
      raise PretrainError(f"config.pretrain.{name}={p[name]} must be >= 0 (0: no such term)")
  if p.map_attribute_weight and config.model.vision.kind != "resnet":
    raise PretrainError(f"config.pretrain.map_attribute_weight={p.map_attribute_weight} needs a "
                        "ResNet image tower (a last feature map for GeM); "
                        f"config.model.vision.kind is {config.model.vision.kind!r}: set it to 0")
  if not p.get("visible_only", False) and p.data.generate.get("visible_only", False):
    raise PretrainError("config.pretrain.data.generate.visible_only=True generates no infrared "
                        "images, and config.pretrain.visible_only=False pretrains on them: set "
                        "both to the same value")
  if p.get("visible_only", False) and p.modality_stems:
    raise PretrainError("config.pretrain.visible_only=True leaves the infrared stem of "
                        "pretrain.modality_stems=True untrained: set one of them to False")
  start = time.perf_counter()
  images, tokens, attribute_labels, sizes, modality = _pretraining_data(config)
  n = len(images)
  if p.batch_size > n:
    raise PretrainError(f"config.pretrain.batch_size={p.batch_size} exceeds the {n} pretraining images")
  vision_cfg = _vision_architecture(config)
  vision = towers.build_vision_tower(vision_cfg)
  text_cfg = config.model.text.to_dict()
  text = towers.build_text_tower(text_cfg)

  key = jax.random.PRNGKey(p.seed)
  k_v, k_t, k_data = jax.random.split(key, 3)
  h, w = input_size(config)
  variables = jax.jit(functools.partial(vision.init, train=False))(
      k_v, jnp.zeros((2, h, w, 3), jnp.float32),
      jnp.array([0, 1]) if vision_cfg["num_modalities"] > 1 else None)
  params = {"vision": variables["params"],
            "text": jax.jit(text.init)(k_t, jnp.zeros((2, text_cfg["context_length"]), jnp.int32))["params"],
            "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
  # The attribute terms' linear heads: training only, never written out.
  head = lambda salt, width: {
      "w": 0.01 * jax.random.normal(jax.random.fold_in(key, salt), (width, sum(sizes))),
      "b": jnp.zeros((sum(sizes),), jnp.float32)}
  if p.attribute_weight:  # on the pooled feature
    params["attribute_head"] = head(1, int(vision_cfg["output_dim"]))
  if p.map_attribute_weight:  # on the GeM-pooled last map (32 x width channels)
    params["map_attribute_head"] = head(2, 32 * int(vision_cfg["width"]))
  params = flax.core.unfreeze(params)
  # No weight decay on gains, biases, embeddings' scale or the temperature (CLIP's recipe).
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim > 1 and "embedding" not in jax.tree_util.keystr(path), params)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(_schedule(p), b1=0.9, b2=0.98, eps=1e-6,
                               weight_decay=p.weight_decay, mask=decay_mask))
  state = State(step=jnp.zeros((), jnp.int32), params=params,
                batch_stats=flax.core.unfreeze(variables["batch_stats"]), opt_state=tx.init(params))
  step_fn = jax.jit(functools.partial(train_step, vision=vision, text=text, tx=tx,
                                      pad=p.aug.pad, flip=p.aug.flip,
                                      attribute_weight=float(p.attribute_weight), sizes=sizes,
                                      stems=int(vision_cfg["num_modalities"]),
                                      map_attribute_weight=float(p.map_attribute_weight),
                                      gem_p=float(config.model.gem_p)),
                    donate_argnums=(0,))

  rng = np.random.default_rng([p.seed, 7])
  order = np.empty(0, np.int64)
  metrics = {}
  bar = tqdm(range(p.steps), desc="pretraining CLIP", unit="step", dynamic_ncols=True)
  for step in bar:
    if len(order) < p.batch_size:  # epochs of a fixed permutation each
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:p.batch_size], order[p.batch_size:]
    state, metrics = step_fn(state, images[idx], tokens[idx], attribute_labels[idx],
                             modality[idx], jax.random.fold_in(k_data, step))
    if step % 20 == 0 or step == p.steps - 1:
      m = jax.device_get(metrics)
      if not np.isfinite(m["loss"]):
        raise PretrainError(f"pretraining loss became {m['loss']} at step {step}; lower "
                            "config.pretrain.lr")
      bar.set_postfix(loss=f"{m['contrastive']:.3f}", acc=f"{m['accuracy']:.2f}",
                      scale=f"{m['scale']:.1f}",
                      **({"attr": f"{m['attributes']:.3f}"} if p.attribute_weight else {}),
                      **({"map": f"{m['map_attributes']:.3f}"} if p.map_attribute_weight else {}))
  bar.close()
  m = jax.device_get(metrics)
  result = {"seconds": round(time.perf_counter() - start, 1), "final_loss": float(m["contrastive"]),
            "final_attribute_loss": float(m["attributes"]),
            "final_map_attribute_loss": float(m["map_attributes"]),
            "final_accuracy": float(m["accuracy"]), "images": n}
  _write(config, jax.device_get(state), vision_cfg, text_cfg, out, result)
  return result


def _write(config, state: State, vision_cfg: dict, text_cfg: dict, out: str, result: dict) -> None:
  """The converted-CLIP folder, the one stem stacked for every modality (unless there is one per
  modality already), published atomically."""
  m = int(config.model.vision.num_modalities)
  copies = m // int(vision_cfg["num_modalities"])
  vparams = flax.core.unfreeze(state.params["vision"])
  vstats = flax.core.unfreeze(state.batch_stats)
  stack = lambda a: np.concatenate([np.asarray(a)] * copies)
  vparams["stem"] = jax.tree.map(stack, vparams["stem"])
  vstats["stem"] = jax.tree.map(stack, vstats["stem"])
  architecture = {k: vision_cfg[k] for k in ("kind", "layers", "width", "output_dim", "heads",
                                             "pos_grid")}
  weights = weights_lib.CLIPWeights(
      vision_config={**architecture, "layers": list(architecture["layers"]), "num_modalities": m},
      text_config=text_cfg, vision_params=vparams, vision_batch_stats=vstats,
      text_params=flax.core.unfreeze(state.params["text"]),
      logit_scale=float(state.params["logit_scale"]), source="eees_jax.pretrain_clip")
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-staging-", dir=parent)
  try:
    target = os.path.join(staging, "clip")
    weights_lib.save_converted(weights, target)
    cfg_path = os.path.join(target, "config.json")
    with open(cfg_path) as f:
      cfg = json.load(f)
    cfg[RECORD_KEY] = {"settings": settings(config), "result": result}
    with open(cfg_path, "w") as f:
      json.dump(cfg, f, indent=2)
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(target, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def recorded_settings(path: str) -> dict | None:
  """The pretraining settings a checkpoint folder records (None if it records none)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    return None
  with open(cfg_path) as f:
    return (json.load(f).get(RECORD_KEY) or {}).get("settings")


def ensure_pretrained(config: ml_collections.ConfigDict) -> str:
  """The checkpoint `config.model.init.checkpoint`, pretrained from `config.pretrain` if absent.

  A folder there made with other settings is refused (delete it to rebuild), as is a folder that
  was not written by this module.
  """
  path = config.model.init.checkpoint
  if not path:
    raise PretrainError("config.pretrain.enabled=True needs config.model.init.checkpoint: the folder "
                        "to write the pretrained CLIP to (e.g. data/synthetic_clip)")
  if os.path.exists(path):
    have = recorded_settings(path)
    if have is None:
      raise PretrainError(f"{path} exists but was not written by eees_jax.pretrain_clip; point "
                          "--config.model.init.checkpoint elsewhere, or set "
                          "--config.pretrain.enabled=False to use it as it is")
    want = settings(config)
    if have != want:
      differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
      raise PretrainError(f"{path} was pretrained with other settings (they differ in: "
                          f"{', '.join(differ)}); delete the folder to pretrain again, or point "
                          "--config.model.init.checkpoint elsewhere")
    return path
  print(f"Pretraining the synthetic CLIP into {path} (once; later runs reuse it) ...", flush=True)
  result = pretrain(config, path)
  print(f"Pretrained in {result['seconds']:.0f} s: final contrastive loss {result['final_loss']:.3f}, "
        f"in-batch image->text accuracy {result['final_accuracy']:.2f}", flush=True)
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if "pretrain" not in config:
    raise app.UsageError(f"{flags.FLAGS['config'].value} has no `pretrain` section")
  out = flags.FLAGS.out or config.model.init.checkpoint
  if not out:
    raise app.UsageError("pass --out or set config.model.init.checkpoint")
  if os.path.exists(out):
    print(f"error: {out} exists; delete it first (or pass another --out)", file=sys.stderr)
    return 2
  result = pretrain(config, out)
  print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  # Defined here, not at import: the trainer imports this module under its own --config flag.
  config_flags.DEFINE_config_file("config", None, "Experiment config with a `pretrain` section.",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "Output folder (default: config.model.init.checkpoint).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
