"""Hugging Face CLIPModel checkpoints (config.json + safetensors) -> CLIPWeights (ViT towers).

HF config defaults fill what config.json leaves out; HF's legacy end-of-text rule (argmax for
configs whose eos_token_id is 2) is kept.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from eees_jax.weights import convert_ops as ops
from eees_jax.weights.converted import CLIPWeights, checked_weights, describe_architecture
from eees_jax.weights.errors import CheckpointError

Tree = ops.Tree

_HF_IGNORED = re.compile(r"(^|\.)position_ids$")


def _hf_blocks(src: ops.Source, prefix: str, layers: int, width: int, mlp_dim: int) -> Tree:
  """HF CLIPEncoder (layers.{i}.self_attn / layer_norm1 / mlp.fc1 ...) -> layers.Transformer."""
  tree: Tree = {}
  for i in range(layers):
    p = f"{prefix}.layers.{i}"
    attn = {f"{n}_proj": ops.dense(src, f"{p}.self_attn.{n}_proj", width, width)
            for n in ("q", "k", "v", "out")}
    tree[f"resblocks_{i}"] = {
        "ln_1": ops.ln(src, f"{p}.layer_norm1", width), "attn": attn,
        "ln_2": ops.ln(src, f"{p}.layer_norm2", width),
        "c_fc": ops.dense(src, f"{p}.mlp.fc1", mlp_dim, width),
        "c_proj": ops.dense(src, f"{p}.mlp.fc2", width, mlp_dim)}
  return tree


def convert_hf_clip(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                    num_modalities: int = 2, origin: str = "Hugging Face checkpoint"
                    ) -> CLIPWeights:
  """HF CLIPModel (config.json dict + state dict) -> CLIPWeights (ViT vision tower)."""
  if config.get("model_type") != "clip":
    raise CheckpointError(f"{origin}: config.json model_type is {config.get('model_type')!r}, "
                          "expected 'clip'")
  vc = config.get("vision_config") or {}
  tc = config.get("text_config") or {}
  src = ops.Source(tensors, origin)
  # Vision (HF CLIPVisionConfig defaults where the config is silent).
  pe = src.require("vision_model.embeddings.patch_embedding.weight")
  width, patch = pe.shape[0], pe.shape[-1]
  pos_key = "vision_model.embeddings.position_embedding.weight"
  pos_grid = ops.square_grid(src.require(pos_key).shape[0], pos_key, origin)
  layers = ops.count_blocks(list(tensors), "vision_model.encoder.layers.", 3)
  mlp_dim = src.require("vision_model.encoder.layers.0.mlp.fc1.weight").shape[0]
  output_dim = src.require("visual_projection.weight").shape[0]
  vcfg = {"kind": "vit", "patch_size": patch, "width": width, "layers": layers,
          "heads": vc.get("num_attention_heads", 12), "output_dim": output_dim,
          "pos_grid": pos_grid, "mlp_dim": mlp_dim, "act": vc.get("hidden_act", "quick_gelu"),
          "ln_epsilon": vc.get("layer_norm_eps", 1e-5), "num_modalities": num_modalities}
  vparams = {
      "patch_embed": ops.stack({"kernel": ops.conv(src, "vision_model.embeddings.patch_embedding.weight",
                                             (width, 3, patch, patch))}, num_modalities),
      "class_embedding": src.take("vision_model.embeddings.class_embedding", (width,)),
      "positional_embedding": src.take(pos_key, (pos_grid ** 2 + 1, width)),
      "ln_pre": ops.ln(src, "vision_model.pre_layrnorm", width),
      "transformer": _hf_blocks(src, "vision_model.encoder", layers, width, mlp_dim),
      "ln_post": ops.ln(src, "vision_model.post_layernorm", width),
      "proj": src.take("visual_projection.weight", (output_dim, width)).T,
  }
  # Text.
  twidth = src.require("text_model.final_layer_norm.weight").shape[0]
  vocab = src.require("text_model.embeddings.token_embedding.weight").shape[0]
  ctx = src.require("text_model.embeddings.position_embedding.weight").shape[0]
  tlayers = ops.count_blocks(list(tensors), "text_model.encoder.layers.", 3)
  tmlp = src.require("text_model.encoder.layers.0.mlp.fc1.weight").shape[0]
  embed = src.require("text_projection.weight").shape[0]
  eos = tc.get("eos_token_id", 49407)
  tcfg = {"vocab_size": vocab, "context_length": ctx, "width": twidth, "layers": tlayers,
          "heads": tc.get("num_attention_heads", 8), "embed_dim": embed, "mlp_dim": tmlp,
          "act": tc.get("hidden_act", "quick_gelu"), "ln_epsilon": tc.get("layer_norm_eps", 1e-5),
          # HF keeps argmax for legacy configs whose eos_token_id is 2 (transformers PR 24773).
          "eos_token_id": None if eos == 2 else int(eos)}
  tparams = {
      "token_embedding": {"embedding": src.take("text_model.embeddings.token_embedding.weight",
                                                (vocab, twidth))},
      "positional_embedding": src.take("text_model.embeddings.position_embedding.weight",
                                       (ctx, twidth)),
      "transformer": _hf_blocks(src, "text_model.encoder", tlayers, twidth, tmlp),
      "ln_final": ops.ln(src, "text_model.final_layer_norm", twidth),
      "text_projection": src.take("text_projection.weight", (embed, twidth)).T,
  }
  logit_scale = src.take("logit_scale", ())
  src.finish(lambda k: bool(_HF_IGNORED.search(k)), describe_architecture(vcfg, tcfg))
  return checked_weights(vcfg, tcfg, vparams, None, tparams, float(logit_scale), origin)
