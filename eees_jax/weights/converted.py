"""CLIPWeights (converted CLIP towers) and the converted folder format that training reads without torch.

A converted folder holds config.json (format, version, tower configs, logit scale, source) and
params.msgpack (flax msgpack of {"vision": {"params", "batch_stats"?}, "text": {"params"}}).
Every CLIPWeights, converted or loaded, is checked against the Flax modules its configs build: the
variable paths and shapes must be exactly the module's.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from eees_jax.models.towers import build_text_tower, build_vision_tower, example_inputs
from eees_jax.weights.errors import CheckpointError, listing

Tree = dict[str, Any]
CONVERTED_FORMAT = "eees_jax-clip"
CONVERTED_VERSION = 1
CONVERTED_PARAMS = "params.msgpack"


@dataclasses.dataclass
class CLIPWeights:
  """Converted CLIP weights, ready for the Flax towers.

  vision_config / text_config: JSON-able dicts for build_vision_tower / build_text_tower
  (vision_config['kind'] is 'resnet' or 'vit'). vision_params / text_params: the towers' 'params'
  collections; vision_batch_stats: the RN tower's 'batch_stats' (None for a ViT).
  """
  vision_config: dict[str, Any]
  text_config: dict[str, Any]
  vision_params: Tree
  vision_batch_stats: Tree | None
  text_params: Tree
  logit_scale: float
  source: str = ""

  def vision_variables(self) -> Tree:
    """{'params': ..., 'batch_stats': ...} (batch_stats only for RN) for module.apply."""
    out = {"params": self.vision_params}
    if self.vision_batch_stats is not None:
      out["batch_stats"] = self.vision_batch_stats
    return out

  def text_variables(self) -> Tree:
    return {"params": self.text_params}



def _shapes(tree: Tree) -> dict[str, tuple]:
  return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _check_against_module(module: nn.Module, args: tuple, variables: Tree, what: str) -> None:
  """The converted tree must have exactly the module's variable paths and shapes."""
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  exp, got = _shapes(flax.core.unfreeze(expected)), _shapes(variables)
  if exp != got:
    diff = sorted(set(exp.items()) ^ set(got.items()))
    raise CheckpointError(f"{what}: converted variables differ from the module's: "
                          + listing([f"{k} {s}" for k, s in diff], "differences"))


def describe_architecture(vcfg: dict, tcfg: dict) -> str:
  if vcfg["kind"] == "resnet":
    v = (f"ModifiedResNet layers={tuple(vcfg['layers'])} width={vcfg['width']} "
         f"output_dim={vcfg['output_dim']} pos_grid={vcfg['pos_grid']}")
  else:
    v = (f"ViT patch={vcfg['patch_size']} width={vcfg['width']} layers={vcfg['layers']} "
         f"heads={vcfg['heads']} output_dim={vcfg['output_dim']} pos_grid={vcfg['pos_grid']}")
  t = (f"text width={tcfg['width']} layers={tcfg['layers']} heads={tcfg['heads']} "
       f"context={tcfg['context_length']} vocab={tcfg['vocab_size']}")
  return f"{v}; {t}"


def checked_weights(vcfg, tcfg, vparams, vstats, tparams, logit_scale, origin) -> CLIPWeights:
  w = CLIPWeights(vcfg, tcfg, vparams, vstats, tparams, logit_scale, origin)
  _check_against_module(build_vision_tower(vcfg), example_inputs(vcfg), w.vision_variables(),
                        f"{origin} (vision)")
  _check_against_module(build_text_tower(tcfg), (jnp.zeros((1, tcfg["context_length"]), jnp.int32),),
                        w.text_variables(), f"{origin} (text)")
  return w


def save_converted(weights: CLIPWeights, out: str, *, overwrite: bool = False) -> None:
  """Writes `out`/config.json and `out`/params.msgpack (flax msgpack); load_converted reads them
  back without torch."""
  out = os.fspath(out)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; choose another folder or overwrite")
  os.makedirs(out, exist_ok=True)
  config = {"format": CONVERTED_FORMAT, "version": CONVERTED_VERSION,
            "vision_config": weights.vision_config, "text_config": weights.text_config,
            "logit_scale": weights.logit_scale, "source": weights.source}
  payload = {"vision": weights.vision_variables(), "text": weights.text_variables()}
  with open(os.path.join(out, CONVERTED_PARAMS), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, payload)))
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def load_converted(path: str) -> CLIPWeights:
  """Reads a folder written by save_converted."""
  path = os.fspath(path)
  cfg_path = os.path.join(path, "config.json")
  params_path = os.path.join(path, CONVERTED_PARAMS)
  for p in (cfg_path, params_path):
    if not os.path.isfile(p):
      raise CheckpointError(f"{path}: not a converted CLIP folder ({os.path.basename(p)} missing)")
  with open(cfg_path) as f:
    config = json.load(f)
  if config.get("format") != CONVERTED_FORMAT or config.get("version") != CONVERTED_VERSION:
    raise CheckpointError(f"{cfg_path}: format {config.get('format')!r} version "
                          f"{config.get('version')!r}, expected {CONVERTED_FORMAT!r} "
                          f"version {CONVERTED_VERSION}")
  with open(params_path, "rb") as f:
    payload = flax.serialization.msgpack_restore(f.read())
  vision = payload["vision"]
  return checked_weights(config["vision_config"], config["text_config"], vision["params"],
                   vision.get("batch_stats"), payload["text"]["params"],
                   float(config["logit_scale"]), config.get("source") or path)
