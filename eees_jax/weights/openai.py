"""OpenAI CLIP state dicts (clip/model.py names, also used by open_clip) -> CLIPWeights.

The architecture is inferred from tensor shapes as OpenAI's build_model does (heads = width / 64,
RN attention-pool heads = 32 * width / 64). nn.MultiheadAttention's in_proj is split into q/k/v;
the single CLIP stem (RN) or patch embedding (ViT) is stacked num_modalities times. Missing,
unknown or mis-shaped tensors raise CheckpointError naming every offending key.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from eees_jax.weights import convert_ops as ops
from eees_jax.weights.converted import CLIPWeights, checked_weights, describe_architecture
from eees_jax.weights.errors import CheckpointError, listing

Tree = ops.Tree


def _openai_blocks(src: ops.Source, prefix: str, layers: int, width: int, mlp_dim: int) -> Tree:
  """OpenAI Transformer (resblocks with nn.MultiheadAttention) -> layers.Transformer params."""
  tree: Tree = {}
  for i in range(layers):
    p = f"{prefix}.resblocks.{i}"
    w_in = src.take(f"{p}.attn.in_proj_weight", (3 * width, width))
    b_in = src.take(f"{p}.attn.in_proj_bias", (3 * width,))
    attn = {name: {"kernel": w_in[j * width:(j + 1) * width].T,
                   "bias": b_in[j * width:(j + 1) * width]}
            for j, name in enumerate(("q_proj", "k_proj", "v_proj"))}
    attn["out_proj"] = ops.dense(src, f"{p}.attn.out_proj", width, width)
    tree[f"resblocks_{i}"] = {
        "ln_1": ops.ln(src, f"{p}.ln_1", width), "attn": attn, "ln_2": ops.ln(src, f"{p}.ln_2", width),
        "c_fc": ops.dense(src, f"{p}.mlp.c_fc", mlp_dim, width),
        "c_proj": ops.dense(src, f"{p}.mlp.c_proj", width, mlp_dim)}
  return tree


_OPENAI_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size)$|"
                             r"(^|\.)num_batches_tracked$|(^|\.)attn_mask$")


def _openai_resnet(src: ops.Source, m: int) -> tuple[dict, Tree, Tree]:
  keys = list(src.tensors)
  layers = [ops.count_blocks(keys, f"visual.layer{s}.", 2) for s in (1, 2, 3, 4)]
  width = src.require("visual.layer1.0.conv1.weight").shape[0]
  pos_key = "visual.attnpool.positional_embedding"
  pos_grid = ops.square_grid(src.require(pos_key).shape[0], pos_key, src.origin)
  output_dim = src.require("visual.attnpool.c_proj.weight").shape[0]
  embed = 32 * width
  cfg = {"kind": "resnet", "layers": layers, "width": width, "output_dim": output_dim,
         "heads": embed // 64, "pos_grid": pos_grid, "num_modalities": m}
  params: Tree = {}
  stats: Tree = {}
  stem_p: Tree = {}
  stem_s: Tree = {}
  chans = [(3, width // 2), (width // 2, width // 2), (width // 2, width)]
  for j, (cin, cout) in enumerate(chans, start=1):
    stem_p[f"conv{j}"] = {"kernel": ops.conv(src, f"visual.conv{j}.weight", (cout, cin, 3, 3))}
    stem_p[f"bn{j}"], stem_s[f"bn{j}"] = ops.bn(src, f"visual.bn{j}", cout)
  params["stem"], stats["stem"] = ops.stack(stem_p, m), ops.stack(stem_s, m)
  inplanes = width
  for s, blocks in enumerate(layers):
    planes = width * 2 ** s
    for i in range(blocks):
      p = f"visual.layer{s + 1}.{i}"
      bp: Tree = {}
      bs: Tree = {}
      bp["conv1"] = {"kernel": ops.conv(src, f"{p}.conv1.weight", (planes, inplanes, 1, 1))}
      bp["bn1"], bs["bn1"] = ops.bn(src, f"{p}.bn1", planes)
      bp["conv2"] = {"kernel": ops.conv(src, f"{p}.conv2.weight", (planes, planes, 3, 3))}
      bp["bn2"], bs["bn2"] = ops.bn(src, f"{p}.bn2", planes)
      bp["conv3"] = {"kernel": ops.conv(src, f"{p}.conv3.weight", (4 * planes, planes, 1, 1))}
      bp["bn3"], bs["bn3"] = ops.bn(src, f"{p}.bn3", 4 * planes)
      if i == 0:  # CLIP: stride > 1 or inplanes != 4 * planes, true for every first block.
        bp["downsample_conv"] = {
            "kernel": ops.conv(src, f"{p}.downsample.0.weight", (4 * planes, inplanes, 1, 1))}
        bp["downsample_bn"], bs["downsample_bn"] = ops.bn(src, f"{p}.downsample.1", 4 * planes)
      params[f"layer{s + 1}_{i}"], stats[f"layer{s + 1}_{i}"] = bp, bs
      inplanes = 4 * planes
  ap = {"positional_embedding": src.take(pos_key, (pos_grid ** 2 + 1, embed))}
  for n in ("q", "k", "v"):
    ap[f"{n}_proj"] = ops.dense(src, f"visual.attnpool.{n}_proj", embed, embed)
  ap["c_proj"] = ops.dense(src, "visual.attnpool.c_proj", output_dim, embed)
  params["attnpool"] = ap
  return cfg, params, stats


def _openai_vit(src: ops.Source, m: int, heads: int | None) -> tuple[dict, Tree]:
  conv = src.require("visual.conv1.weight")
  width, patch = conv.shape[0], conv.shape[-1]
  keys = list(src.tensors)
  layers = ops.count_blocks(keys, "visual.transformer.resblocks.", 3)
  mlp_dim = src.require("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
  pos_grid = ops.square_grid(src.require("visual.positional_embedding").shape[0],
                          "visual.positional_embedding", src.origin)
  output_dim = src.require("visual.proj").shape[1]
  cfg = {"kind": "vit", "patch_size": patch, "width": width, "layers": layers,
         "heads": heads or width // 64, "output_dim": output_dim, "pos_grid": pos_grid,
         "mlp_dim": mlp_dim, "act": "quick_gelu", "ln_epsilon": 1e-5, "num_modalities": m}
  params = {
      "patch_embed": ops.stack({"kernel": ops.conv(src, "visual.conv1.weight",
                                             (width, 3, patch, patch))}, m),
      "class_embedding": src.take("visual.class_embedding", (width,)),
      "positional_embedding": src.take("visual.positional_embedding",
                                       (pos_grid ** 2 + 1, width)),
      "ln_pre": ops.ln(src, "visual.ln_pre", width),
      "transformer": _openai_blocks(src, "visual.transformer", layers, width, mlp_dim),
      "ln_post": ops.ln(src, "visual.ln_post", width),
      "proj": src.take("visual.proj", (width, output_dim)),
  }
  return cfg, params


def _openai_text(src: ops.Source, heads: int | None) -> tuple[dict, Tree]:
  width = src.require("ln_final.weight").shape[0]
  vocab = src.require("token_embedding.weight").shape[0]
  ctx = src.require("positional_embedding").shape[0]
  embed = src.require("text_projection").shape[1]
  layers = ops.count_blocks(list(src.tensors), "transformer.resblocks.", 2)
  mlp_dim = src.require("transformer.resblocks.0.mlp.c_fc.weight").shape[0]
  cfg = {"vocab_size": vocab, "context_length": ctx, "width": width, "layers": layers,
         "heads": heads or width // 64, "embed_dim": embed, "mlp_dim": mlp_dim,
         "act": "quick_gelu", "ln_epsilon": 1e-5, "eos_token_id": None}
  params = {
      "token_embedding": {"embedding": src.take("token_embedding.weight", (vocab, width))},
      "positional_embedding": src.take("positional_embedding", (ctx, width)),
      "transformer": _openai_blocks(src, "transformer", layers, width, mlp_dim),
      "ln_final": ops.ln(src, "ln_final", width),
      "text_projection": src.take("text_projection", (width, embed)),
  }
  return cfg, params


def convert_openai_state_dict(tensors: Mapping[str, np.ndarray], *, num_modalities: int = 2,
                              vision_heads: int | None = None, text_heads: int | None = None,
                              origin: str = "state dict") -> CLIPWeights:
  """OpenAI CLIP state dict (RN or ViT; clip/model.py names) -> CLIPWeights.

  vision_heads / text_heads override OpenAI's width / 64 rule (ViT and text only; the RN pool
  always has 32 * width / 64 heads in OpenAI's models).
  """
  src = ops.Source(tensors, origin)
  if "visual.proj" in tensors:
    vcfg, vparams = _openai_vit(src, num_modalities, vision_heads)
    vstats = None
  elif "visual.layer1.0.conv1.weight" in tensors:
    vcfg, vparams, vstats = _openai_resnet(src, num_modalities)
  else:
    raise CheckpointError(f"{origin}: not an OpenAI CLIP state dict: neither 'visual.proj' (ViT) "
                          "nor 'visual.layer1.0.conv1.weight' (ResNet) is present "
                          f"({listing(sorted(tensors), 'keys present')})")
  tcfg, tparams = _openai_text(src, text_heads)
  logit_scale = src.take("logit_scale", ())
  src.finish(lambda k: bool(_OPENAI_IGNORED.search(k)), describe_architecture(vcfg, tcfg))
  return checked_weights(vcfg, tcfg, vparams, vstats, tparams, float(logit_scale), origin)
