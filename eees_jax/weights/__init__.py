"""CLIP weights: read OpenAI / Hugging Face checkpoints, convert them to the Flax towers, save, merge.

`load_clip` reads (no pickle is ever executed):
- an OpenAI-format state dict (the names of OpenAI's clip/model.py, also used by open_clip):
  `.safetensors`, a torch.save file (torch's weights-only loader), or OpenAI's own TorchScript
  downloads (RN50.pt, ViT-B-16.pt; read from the zip without running code), see readers.py;
- a Hugging Face CLIP folder (config.json + model.safetensors or a sharded index), ViT towers only;
- a folder written by `save_converted` (config.json + params.msgpack).

Modules by job: readers (files -> numpy tensors), openai / hf (tensors -> CLIPWeights), converted
(CLIPWeights and its folder format), merge (partial loading into a model's parameters).
"""
from __future__ import annotations

import json
import os

from eees_jax.weights.converted import (CONVERTED_FORMAT, CONVERTED_PARAMS, CONVERTED_VERSION,
                                        CLIPWeights, load_converted, save_converted)
from eees_jax.weights.errors import CheckpointError
from eees_jax.weights.hf import convert_hf_clip
from eees_jax.weights.merge import MergeReport, count_params, merge_params
from eees_jax.weights.openai import convert_openai_state_dict
from eees_jax.weights.readers import EXPECTED_SOURCES, read_hf_folder, read_state_dict

__all__ = ["CLIPWeights", "CheckpointError", "MergeReport", "CONVERTED_FORMAT", "CONVERTED_PARAMS",
           "CONVERTED_VERSION", "convert_hf_clip", "convert_openai_state_dict", "count_params",
           "load_clip", "load_converted", "merge_params", "read_hf_folder", "read_state_dict",
           "save_converted"]


def load_clip(path: str, *, num_modalities: int = 2) -> CLIPWeights:
  """CLIP weights from an OpenAI-format file, a Hugging Face folder or a save_converted folder.

  num_modalities: copies of the stem / patch embedding to make (ignored for a converted folder,
  which keeps the number it was saved with).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise CheckpointError(f"{path} is a folder without config.json, so neither a Hugging Face "
                            f"CLIP folder nor a convert_clip output; {EXPECTED_SOURCES}")
    with open(cfg_path) as f:
      config = json.load(f)
    if config.get("format") == CONVERTED_FORMAT:
      return load_converted(path)
    config, tensors = read_hf_folder(path)
    return convert_hf_clip(config, tensors, num_modalities=num_modalities, origin=path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint not found: {path}")
  return convert_openai_state_dict(read_state_dict(path), num_modalities=num_modalities,
                                   origin=path)
