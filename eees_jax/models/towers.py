"""The CLIP towers built from their JSON-able configs (a converted checkpoint's or the experiment's).

vision_config['kind'] picks ModifiedResNet ('resnet') or VisionTransformer ('vit'); every other key
is a field of that module. The configs are plain dicts so they can be stored with a checkpoint and
the same module rebuilt from them later.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from eees_jax.models.clip_resnet import ModifiedResNet
from eees_jax.models.clip_text import TextTransformer
from eees_jax.models.clip_vit import VisionTransformer


def build_vision_tower(vision_config: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """The Flax vision tower for a vision config (e.g. CLIPWeights.vision_config).

  overrides set options that do not change the parameters, e.g. last_stride=1,
  interpolation='bilinear', dtype=jnp.bfloat16, patch_stride=12 (ViT).
  """
  cfg = dict(vision_config)
  arch = cfg.pop("kind", None)
  cfg.update(overrides)
  if arch == "resnet":
    cfg["layers"] = tuple(cfg["layers"])
    cls = ModifiedResNet
  elif arch == "vit":
    cls = VisionTransformer
  else:
    raise ValueError(f"vision_config['kind'] must be 'resnet' or 'vit', got {arch!r}")
  return _construct(cls, cfg)


def build_text_tower(text_config: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """The Flax text tower for a text config (overrides: dtype, attention_impl)."""
  return _construct(TextTransformer, {**text_config, **overrides})


def _construct(cls, cfg: dict) -> nn.Module:
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f"{cls.__name__} has no option(s) {unknown}; options: {sorted(fields)}")
  return cls(**cfg)


def example_inputs(vision_config: Mapping[str, Any]) -> tuple:
  """Arguments for the vision tower's init at its native resolution (one image)."""
  if vision_config["kind"] == "resnet":
    side = vision_config["pos_grid"] * 32
  else:
    side = vision_config["pos_grid"] * vision_config["patch_size"]
  m = vision_config["num_modalities"]
  return (jnp.zeros((1, side, side, 3), jnp.float32), jnp.zeros((1,), jnp.int32) if m > 1 else None)
