"""Export a trained model's image and text embedders in forms a deployment loads without this code.

  python -m eees_jax.export --workdir W --out DIR [--step latest|best|N] \\
      [--platforms cpu,cuda,tpu] [--overwrite]

writes DIR/
  image_embedder.jax_export   serialized jax.export: (images uint8 [b, H, W, 3], modality int32 [b])
                              -> float32 [b, feature_dim], the test-time feature (CLIP
                              normalisation inside; b symbolic). Load: jax.export.deserialize(
                              open(path, 'rb').read()).call(images, modality)
  text_embedder.jax_export    tokens int32 [b, L] -> float32 [b, joint_dim], unit text features
  saved_model/                TensorFlow SavedModel (jax2tf) with the same two functions as
                              signatures "embed_images" (images, modality -> features) and
                              "embed_text" (tokens -> features); parameters are variables
  tokenizer/                  the vocabulary files of the text tokenizer
  embedders.json              inputs, outputs, dimensions, how to resize and tokenise, the model's
                              identity (inference's model_id, workdir, step)

The parameters are constants inside the jax.export artifacts; the artifacts are lowered for every
platform in --platforms (default cpu, cuda and tpu), so one file runs on any of them. Images must
be resized to the model's input size first, as evaluation does (anti-aliased bilinear, rounded
to uint8: `tf.image.resize(image, (H, W), "bilinear", antialias=True)`); modality 0 is visible, 1
infrared. The folder is written into a staging folder and renamed into place (eees_jax/staging.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import TYPE_CHECKING, Sequence

import jax
from jax import export as jax_export
import numpy as np

from data_pipelines.records import MODALITY_NAMES
from eees_jax import staging

if TYPE_CHECKING:
  from eees_jax.inference import Embedder

FORMAT, VERSION = "eees-jax-export", 1
IMAGE_FILE, TEXT_FILE = "image_embedder.jax_export", "text_embedder.jax_export"
SAVED_MODEL, TOKENIZER, SPEC = "saved_model", "tokenizer", "embedders.json"
PLATFORMS = ("cpu", "cuda", "tpu")


class ExportError(ValueError):
  """An export that cannot be written (bad option, existing output)."""


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def export_image_embedder(model: Embedder, platforms: Sequence[str] = PLATFORMS) -> jax_export.Exported:
  """jax.export of (images uint8 [b, H, W, 3], modality int32 [b]) -> test-time features."""
  fn, variables = model.image_function()
  variables = _host(variables)
  b, = jax_export.symbolic_shape("b")
  return jax_export.export(jax.jit(lambda images, modality: fn(variables, images, modality)),
                           platforms=tuple(platforms))(
      jax.ShapeDtypeStruct((b, model.height, model.width, 3), np.uint8),
      jax.ShapeDtypeStruct((b,), np.int32))


def export_text_embedder(model: Embedder, platforms: Sequence[str] = PLATFORMS) -> jax_export.Exported:
  """jax.export of tokens int32 [b, L] -> unit text features [b, joint_dim]."""
  fn, params = model.text_function()
  params = _host(params)
  b, = jax_export.symbolic_shape("b")
  return jax_export.export(jax.jit(lambda tokens: fn(params, tokens)), platforms=tuple(platforms))(
      jax.ShapeDtypeStruct((b, model.tokenizer.context_length), np.int32))


def save_tf(model: Embedder, path: str, platforms: Sequence[str] = PLATFORMS) -> None:
  """A TensorFlow SavedModel at `path` with signatures embed_images and embed_text (jax2tf, native
  serialization; parameters as tf.Variables)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  image_fn, variables = model.image_function()
  text_fn, text_params = model.text_function()
  h, w, length = model.height, model.width, model.tokenizer.context_length
  convert = dict(with_gradient=False, native_serialization_platforms=tuple(platforms))
  image_tf = jax2tf.convert(image_fn, polymorphic_shapes=[None, f"(b, {h}, {w}, 3)", "(b,)"],
                            **convert)
  text_tf = jax2tf.convert(text_fn, polymorphic_shapes=[None, f"(b, {length})"], **convert)
  module = tf.Module()
  module.image_variables = tf.nest.map_structure(tf.Variable, _host(variables))
  module.text_variables = tf.nest.map_structure(tf.Variable, _host(text_params))

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, h, w, 3], tf.uint8, name="images"),
      tf.TensorSpec([None], tf.int32, name="modality")])
  def embed_images(images, modality):
    return {"features": image_tf(module.image_variables, images, modality)}

  @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, length], tf.int32,
                                                               name="tokens")])
  def embed_text(tokens):
    return {"features": text_tf(module.text_variables, tokens)}

  module.embed_images, module.embed_text = embed_images, embed_text
  tf.saved_model.save(module, path, signatures={"embed_images": embed_images,
                                                "embed_text": embed_text})


def _tokenizer_record(model: Embedder, folder: str) -> dict:
  """Copies the tokenizer's vocabulary into `folder` and describes how to tokenise."""
  from eees_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  spec = model.tokenizer_spec
  os.makedirs(folder)
  tok = model.tokenizer
  common = {"context_length": tok.context_length, "sot_id": tok.sot_id, "eot_id": tok.eot_id,
            "vocab_size": tok.vocab_size,
            "layout": "OpenAI clip.tokenize(texts, truncate=True): start-of-text, the first "
                      "context_length - 2 BPE ids, end-of-text, zeros; int32",
            "cleaning": "ftfy.fix_text, html.unescape twice, strip, whitespace runs collapsed, "
                        "lower case (OpenAI simple_tokenizer)"}
  if spec == "clip" or os.path.isfile(spec):
    source = tokenizer_lib.default_bpe_path() if spec == "clip" else spec
    name = os.path.basename(source)
    shutil.copy(source, os.path.join(folder, name))
    return {"kind": "openai-bpe", "files": [f"{TOKENIZER}/{name}"], **common}
  files = []
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(spec, name), os.path.join(folder, name))
    files.append(f"{TOKENIZER}/{name}")
  return {"kind": "huggingface-clip", "files": files, **common}


def export(model: Embedder, out: str, platforms: Sequence[str] = PLATFORMS,
           overwrite: bool = False, tf_saved_model: bool = True) -> dict:
  """Writes the export folder `out` for `model`; returns embedders.json's content."""
  from eees_jax import search  # pylint: disable=g-import-not-at-top (its feature layout name)
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ExportError(f"platforms {list(platforms)}: choose from {', '.join(PLATFORMS)}")
  out = os.path.abspath(out)
  if os.path.exists(out):
    if not os.path.isfile(os.path.join(out, SPEC)) and os.listdir(out):
      raise ExportError(f"--out {out} exists and holds no {SPEC}: not an export folder")
    if not overwrite and os.listdir(out):
      raise ExportError(f"--out {out} already holds an export; pass --overwrite to replace it")
  with staging.staged_folder(out) as folder:
    with open(os.path.join(folder, IMAGE_FILE), "wb") as f:
      f.write(export_image_embedder(model, platforms).serialize())
    with open(os.path.join(folder, TEXT_FILE), "wb") as f:
      f.write(export_text_embedder(model, platforms).serialize())
    if tf_saved_model:
      save_tf(model, os.path.join(folder, SAVED_MODEL), platforms)
    per_view = model.feature_dim // 2 if model.flip else model.feature_dim
    spec = {
        "format": FORMAT, "version": VERSION, "platforms": list(platforms),
        "model": {"model_id": model.model_id, "workdir": os.path.abspath(model.workdir),
                  "step": int(model.step)},
        "image_embedder": {
            "jax_export": IMAGE_FILE, "saved_model_signature": "embed_images",
            "inputs": {
                "images": {"dtype": "uint8", "shape": ["b", model.height, model.width, 3],
                           "layout": "RGB, resized to the model's input size with "
                                     "tf.image.resize(bilinear, antialias=True), rounded"},
                "modality": {"dtype": "int32", "shape": ["b"],
                             "values": {n: m for m, n in MODALITY_NAMES.items()
                                        if n in model.modalities}}},
            "output": {"name": "features", "dtype": "float32", "shape": ["b", model.feature_dim],
                       "layout": search.FEATURE_LAYOUT, "similarity": "cosine"},
            "joint_slice": [per_view - model.joint_dim, per_view],
            "joint_slice_note": "features[:, a:b] is l2(v), comparable with text features"},
        "text_embedder": {
            "jax_export": TEXT_FILE, "saved_model_signature": "embed_text",
            "inputs": {"tokens": {"dtype": "int32",
                                  "shape": ["b", model.tokenizer.context_length]}},
            "output": {"name": "features", "dtype": "float32", "shape": ["b", model.joint_dim],
                       "layout": "l2-normalised text feature in CLIP's joint space"}},
        "tokenizer": _tokenizer_record(model, os.path.join(folder, TOKENIZER)),
        "saved_model": SAVED_MODEL if tf_saved_model else None,
    }
    with open(os.path.join(folder, SPEC), "w") as f:
      json.dump(spec, f, indent=1)
      f.write("\n")
  return spec


def main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  parser = argparse.ArgumentParser(prog="python -m eees_jax.export",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="trained model's workdir")
  parser.add_argument("--step", type=lambda v: int(v) if v.isdigit() else v, default="latest",
                      help="latest, best or a step number")
  parser.add_argument("--out", required=True, help="export folder to write")
  parser.add_argument("--platforms", default=",".join(PLATFORMS),
                      help="comma-separated platforms to lower for: cpu, cuda, tpu")
  parser.add_argument("--overwrite", action="store_true", help="replace an export at --out")
  args = parser.parse_args(argv)
  try:
    from eees_jax import inference  # pylint: disable=g-import-not-at-top
    model = inference.load(args.workdir, args.step)
    spec = export(model, args.out, tuple(p for p in args.platforms.split(",") if p),
                  args.overwrite)
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"exported {args.workdir} step {spec['model']['step']} (model {spec['model']['model_id']}, "
        f"features {model.feature_dim}-d, text {model.joint_dim}-d, platforms "
        f"{', '.join(spec['platforms'])}) to {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
