"""Converts a CLIP checkpoint once into the Flax layout, so training never needs torch.

  python -m eees_jax.convert_clip SRC OUT [--num_modalities 2] [--overwrite]

SRC: an OpenAI-format file (RN50.pt / ViT-B-16.pt as downloaded, a torch.save state dict, or a
.safetensors with the same names) or a Hugging Face CLIP folder. OUT: a new folder with config.json
and params.msgpack, read by eees_jax.weights.load_converted (or load_clip).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from eees_jax import weights as W


def describe(weights: W.CLIPWeights) -> str:
  """Architecture and parameter counts, one item per line."""
  v, t = weights.vision_config, weights.text_config
  if v["kind"] == "resnet":
    arch = (f"vision: ModifiedResNet layers={tuple(v['layers'])} width={v['width']} "
            f"heads={v['heads']} output_dim={v['output_dim']} pos_grid={v['pos_grid']}x"
            f"{v['pos_grid']} (input {v['pos_grid'] * 32})")
  else:
    arch = (f"vision: ViT patch={v['patch_size']} width={v['width']} layers={v['layers']} "
            f"heads={v['heads']} output_dim={v['output_dim']} pos_grid={v['pos_grid']}x"
            f"{v['pos_grid']} (input {v['pos_grid'] * v['patch_size']})")
  stats = (f", {W.count_params(weights.vision_batch_stats):,} batch-norm statistics"
           if weights.vision_batch_stats is not None else "")
  lines = [
      f"source: {weights.source}",
      arch + f", {v['num_modalities']} modality-specific stem(s)",
      f"vision parameters: {W.count_params(weights.vision_params):,}{stats}",
      (f"text: width={t['width']} layers={t['layers']} heads={t['heads']} "
       f"embed_dim={t['embed_dim']} context={t['context_length']} vocab={t['vocab_size']} "
       f"end-of-text={'argmax' if t['eos_token_id'] is None else t['eos_token_id']}"),
      f"text parameters: {W.count_params(weights.text_params):,}",
      f"logit_scale: {weights.logit_scale:.4f}",
  ]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("src", help="OpenAI-format checkpoint file or Hugging Face CLIP folder")
  parser.add_argument("out", help="output folder (must not exist or be empty)")
  parser.add_argument("--num_modalities", type=int, default=2,
                      help="copies of the stem / patch embedding (2: visible + infrared)")
  parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
  args = parser.parse_args(argv)
  try:
    weights = W.load_clip(args.src, num_modalities=args.num_modalities)
    W.save_converted(weights, args.out, overwrite=args.overwrite)
  except (W.CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(describe(weights))
  print(f"written: {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
