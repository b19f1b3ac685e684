"""Config -> the pieces training, inference and bench/ share, built one way.

Model side (no data, no descriptions, no CLIP file needed once the tower configs are known):
`ModelSpec` (tower configs, number of classes, dtype) -> `build_model` -> the EEES module and the
text tower; `init_params` / `init_state` create parameters and the train state; `make_optimizer`
the optimiser. The pretrained CLIP (`config.model.init.checkpoint`) only fills the spec's tower
configs and the initial parameters of a training run.

Data side (training only): `load_train_data` reads the training records and their descriptions;
`text_arrays` tokenises the descriptions into what the train step reads (frozen-tower features,
cached in the workdir, or tokens for a trainable tower). `build_experiment` assembles everything a
training run needs. The data side imports the data set readers only when it runs, so inference and
bench/, which import this module for the model side, load no training-data code (nor the
tokenizer's packages: bench/ runs on accelerator hosts with only JAX's).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipelines.records import TrainSet
from eees_jax import config_validation, losses, optim, sharding
from eees_jax import weights as weights_lib
from eees_jax.models import eees as eees_lib
from eees_jax.models import towers

def compute_dtype(name: str) -> Any:
  """config.model.dtype -> the jnp dtype (config_validation.DTYPES names the allowed ones)."""
  if name not in config_validation.DTYPES:
    raise ValueError(f"config.model.dtype={name!r} is not one of {', '.join(config_validation.DTYPES)}")
  return jnp.dtype(name)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # {"model": ..., "pair": ..., "text": ... (only when the text tower trains)}
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What fixes the network's parameters and computation: JSON-able, stored with every checkpoint."""
  vision: dict             # vision tower config (towers.build_vision_tower), 'kind' resnet | vit
  text: dict               # text tower config (towers.build_text_tower)
  num_classes: int         # identities of the classifiers
  dtype: str = "float32"   # compute dtype (parameters stay float32)
  gem_p: float = 3.0       # initial GeM exponent
  freeze_encoder_bn: bool = False  # the tower's BatchNorm statistics fixed in training

  def to_json(self) -> dict:
    return {"vision": dict(self.vision), "text": dict(self.text), "num_classes": self.num_classes,
            "dtype": self.dtype, "gem_p": self.gem_p, "freeze_encoder_bn": self.freeze_encoder_bn}

  @classmethod
  def from_json(cls, d: dict) -> "ModelSpec":
    return cls(vision=dict(d["vision"]), text=dict(d["text"]), num_classes=int(d["num_classes"]),
               dtype=str(d["dtype"]), gem_p=float(d["gem_p"]),
               freeze_encoder_bn=bool(d.get("freeze_encoder_bn", False)))


class Model(NamedTuple):
  eees: eees_lib.EEES   # image tower + f / v heads
  text: nn.Module       # CLIP text tower (frozen features or trained jointly)


def load_pretrained(config: ml_collections.ConfigDict) -> weights_lib.CLIPWeights | None:
  """The CLIP checkpoint of config.model.init.checkpoint (None when it is empty)."""
  path = config.model.init.checkpoint
  if not path:
    return None
  if "pretrain" in config and config.pretrain.enabled:
    from eees_jax import pretrain_clip  # pylint: disable=g-import-not-at-top (training only)
    pretrain_clip.ensure_pretrained(config)
  if not os.path.exists(path):
    raise weights_lib.CheckpointError(
        f"config.model.init.checkpoint={path!r} does not exist. Download OpenAI's CLIP RN50 weights "
        "(RN50.pt) on a machine with internet access, convert them once with "
        "`python -m eees_jax.convert_clip RN50.pt weights/RN50` and pass "
        "--config.model.init.checkpoint=weights/RN50, or set it to '' to train from scratch.")
  return weights_lib.load_clip(path)


# Options that do not change a tower's parameters: they come from the experiment config even when
# the architecture comes from a checkpoint.
_VISION_RUNTIME_OPTIONS = {"resnet": ("last_stride", "interpolation", "num_modalities", "remat"),
                           "vit": ("patch_stride", "interpolation", "num_modalities")}


def tower_configs(config: ml_collections.ConfigDict,
                  pretrained: weights_lib.CLIPWeights | None) -> tuple[dict, dict]:
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


def model_spec(config: ml_collections.ConfigDict, num_classes: int,
               pretrained: weights_lib.CLIPWeights | None) -> ModelSpec:
  vision, text = tower_configs(config, pretrained)
  compute_dtype(config.model.dtype)  # validates the name
  return ModelSpec(vision=vision, text=text, num_classes=int(num_classes),
                   dtype=config.model.dtype, gem_p=float(config.model.gem_p),
                   freeze_encoder_bn=bool(config.model.freeze_encoder_bn))


def build_model(spec: ModelSpec) -> Model:
  """The EEES module and the text tower of a spec: the one construction path of the project."""
  eees = eees_lib.EEES(vision=spec.vision, num_classes=spec.num_classes, gem_p=spec.gem_p,
                       dtype=compute_dtype(spec.dtype), freeze_encoder_bn=spec.freeze_encoder_bn)
  return Model(eees=eees, text=towers.build_text_tower(spec.text))


def init_model_variables(model: Model, rng: jax.Array, height: int, width: int) -> dict:
  """Fresh {'params', 'batch_stats'} of the EEES module (images of height x width)."""
  return jax.jit(functools.partial(model.eees.init, train=False))(
      rng, jnp.zeros((2, height, width, 3), jnp.float32), jnp.array([0, 1], jnp.int32))


def init_text_params(model: Model, rng: jax.Array,
                     pretrained: weights_lib.CLIPWeights | None = None, load: bool = False) -> Any:
  """The text tower's parameters: fresh, or the checkpoint's when `load`."""
  tokens = jnp.zeros((1, model.text.context_length), jnp.int32)
  params = flax.core.unfreeze(jax.jit(model.text.init)(rng, tokens)["params"])
  if load and pretrained is not None:
    params = weights_lib.merge_params(params, pretrained.text_params, include=(".*",),
                                      what="text tower")
  return params


def init_params(config: ml_collections.ConfigDict, model: Model, rng: jax.Array,
                pretrained: weights_lib.CLIPWeights | None = None) -> tuple[dict, dict]:
  """(params, batch_stats) of everything the optimiser sees; CLIP towers from `pretrained` where
  config.model.init.load says so. Under jax.eval_shape it gives the optimiser its tree structure."""
  k_model, k_pair, k_text, _ = jax.random.split(rng, 4)
  load = tuple(config.model.init.load)
  variables = init_model_variables(model, k_model, config.input.height, config.input.width)
  params = {"model": flax.core.unfreeze(variables["params"])}
  batch_stats = flax.core.unfreeze(variables.get("batch_stats", {}))
  if pretrained is not None and "vision" in load:
    params["model"]["encoder"] = weights_lib.merge_params(
        params["model"]["encoder"], pretrained.vision_params, include=(".*",), what="vision tower")
    if pretrained.vision_batch_stats:
      batch_stats["encoder"] = weights_lib.merge_params(
          batch_stats["encoder"], pretrained.vision_batch_stats, include=(".*",),
          what="vision batch statistics")
  pair = losses.init_pair_params(k_pair, config.loss.pair.kind, model.text.embed_dim,
                                 num_heads=config.loss.pair.num_heads)
  if pair:
    params["pair"] = pair
  if config.text.trainable:
    params["text"] = init_text_params(model, k_text, pretrained, "text" in load)
  return params, batch_stats


def frozen_text_params(config: ml_collections.ConfigDict, model: Model,
                       pretrained: weights_lib.CLIPWeights | None) -> Any:
  """The parameters of a frozen text tower (the checkpoint's, or fixed random ones)."""
  return init_text_params(model, jax.random.PRNGKey(config.seed + 1), pretrained,
                          "text" in tuple(config.model.init.load))


def make_optimizer(config: ml_collections.ConfigDict, model: Model,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, Callable]:
  """(tx, schedule); the optimiser needs the parameter tree's structure only."""
  abstract = jax.eval_shape(lambda: init_params(config, model, jax.random.PRNGKey(0))[0])
  return optim.make_optimizer(abstract, config.optim, steps_per_epoch)


def init_state(config: ml_collections.ConfigDict, model: Model, tx: optax.GradientTransformation,
               pretrained: weights_lib.CLIPWeights | None) -> TrainState:
  """Fresh train state (CLIP towers from `pretrained` where config.model.init.load says so)."""
  rng = jax.random.PRNGKey(config.seed)
  params, batch_stats = init_params(config, model, rng, pretrained)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=jax.random.split(rng, 4)[3])


# ----------------------------------------------------------------------------------------------
# Training data.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainData:
  """Training records and the description of each (SPEC section 4)."""
  train_set: TrainSet
  texts: list[str]     # [num_records]


def load_train_data(config: ml_collections.ConfigDict) -> TrainData:
  """Reads the training set (generating the synthetic one if needed) and its descriptions."""
  # pylint: disable=g-import-not-at-top (module doc)
  from data_pipelines import datasets, descriptions as descriptions_lib, registry
  train_set = registry.load_train_set(config.dataset)
  texts = descriptions_lib.load_descriptions(datasets.descriptions_path(config.dataset),
                                             train_set.records, field=config.dataset.description_field)
  return TrainData(train_set=train_set, texts=list(texts))


def text_arrays(config: ml_collections.ConfigDict, workdir: str, data: TrainData, spec: ModelSpec,
                model: Model, text_params: Any | None) -> dict[str, np.ndarray]:
  """What the train step reads about descriptions, each distinct text tokenised once: "index"
  (record -> distinct text) and either "tokens" (trainable tower) or "features" (the frozen tower
  `text_params`, embedded once and cached in the workdir)."""
  from eees_jax import text_features  # pylint: disable=g-import-not-at-top (module doc)
  from eees_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = tokenizer_lib.build_tokenizer(config.text.tokenizer,
                                            context_length=spec.text["context_length"])
  tokens, index = text_features.unique_tokens(data.texts, tokenizer.tokenize)
  arrays = {"index": index}
  if config.text.trainable:
    arrays["tokens"] = tokens.astype(np.int32)
  else:
    arrays["features"] = text_features.frozen_text_features(
        workdir, tokens, spec.text, text_params,
        lambda p, t: model.text.apply({"params": p}, t), config.text.embed_batch_size)
  return arrays


# ----------------------------------------------------------------------------------------------
# A training run.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Experiment:
  """Everything a training run needs besides the mutable state."""
  config: ml_collections.ConfigDict
  workdir: str
  train_set: TrainSet
  spec: ModelSpec
  model: eees_lib.EEES             # the image network (build_model(spec).eees)
  text_tower: nn.Module            # build_model(spec).text
  text_model: nn.Module | None     # the text tower when it trains, else None
  text_params: Any | None          # the frozen text tower's parameters (None when it trains)
  text_arrays: dict[str, np.ndarray]
  tx: optax.GradientTransformation
  schedule: Callable
  steps_per_epoch: int
  total_steps: int
  mesh: jax.sharding.Mesh


def build_experiment(config: ml_collections.ConfigDict, workdir: str
                     ) -> tuple[Experiment, weights_lib.CLIPWeights | None]:
  """Reads the data, tokenises the descriptions and builds model, optimiser and mesh; returns the
  experiment and the pretrained CLIP weights (for init_state; drop them afterwards)."""
  data = load_train_data(config)
  pretrained = load_pretrained(config)
  spec = model_spec(config, data.train_set.num_classes, pretrained)
  model = build_model(spec)
  frozen = None if config.text.trainable else frozen_text_params(config, model, pretrained)
  arrays = text_arrays(config, workdir, data, spec, model, frozen)

  from data_pipelines import sampler  # pylint: disable=g-import-not-at-top (module doc)
  P, K = config.input.P, config.input.K
  steps_per_epoch = sampler.steps_per_epoch(data.train_set, P, K)
  total_steps = steps_per_epoch * config.train.epochs
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)
  mesh = sharding.make_mesh(config.mesh.data)
  sharding.check_batch_divisible(3 * P * K, mesh, "training (3 * P * K)")
  sharding.check_batch_divisible(config.input.eval_batch_size, mesh, "config.input.eval_batch_size")
  tx, schedule = make_optimizer(config, model, steps_per_epoch)
  exp = Experiment(config=config, workdir=workdir, train_set=data.train_set, spec=spec,
                   model=model.eees, text_tower=model.text,
                   text_model=model.text if config.text.trainable else None, text_params=frozen,
                   text_arrays=arrays, tx=tx, schedule=schedule, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps, mesh=mesh)
  return exp, pretrained


def init_experiment_state(exp: Experiment,
                          pretrained: weights_lib.CLIPWeights | None) -> TrainState:
  """init_state for a built experiment."""
  return init_state(exp.config, Model(exp.model, exp.text_tower), exp.tx, pretrained)
