"""Use a trained model: `load(workdir)` -> an Embedder of images and text, from the workdir alone.

    from eees_jax import inference
    model = inference.load("workdir/synthetic", step="best")
    gallery = model.embed_images(["a.jpg", "b.jpg"], "visible")      # [2, model.feature_dim]
    query = model.embed_images(ir_uint8_array, "infrared")          # uint8 [N, H, W, 3], any size
    scores = query @ gallery.T                                        # cosine (features are unit)
    text = model.embed_text(["a woman in a long dark skirt"])        # [1, model.joint_dim]
    joint = model.embed_joint(["a.jpg"], "visible")                   # l2(v), comparable with text

Nothing but the workdir is read: the checkpoint's meta records the model (tower configs, classes,
dtype, input size, flip), the tokenizer, and where the text tower's parameters are (in the train
state, or written once into the workdir when the tower was frozen); see eees_jax/checkpoints.py.
No data set, description file or CLIP checkpoint is needed.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from data_pipelines.records import INFRARED, MODALITY_NAMES, VISIBLE, ImageRecord
from eees_jax import checkpoints, embedding, experiment, sharding, xla_cpu
from eees_jax.checkpoints import WorkdirError
from eees_jax.models import eees as eees_lib
from eees_jax.models import tokenizer as tokenizer_lib

__all__ = ["Embedder", "WorkdirError", "load"]

_MODALITIES = {name: m for m, name in MODALITY_NAMES.items()}


class Embedder:
  """Image and text embeddings of one trained checkpoint. Build it with `load`.

  Attributes: workdir, step, config (the experiment config of the run), spec (experiment.ModelSpec),
  tokenizer (models.tokenizer.Tokenizer) and tokenizer_spec ('clip' or its files in the workdir),
  height / width (input size), flip, feature_dim (test-time feature), joint_dim (CLIP joint space:
  embed_joint and embed_text), modalities (the names of the modalities it has stems for),
  batch_size, model_id (identifies parameters, step and feature layout: an index built by another
  model has another id).
  """

  def __init__(self, *, workdir: str, step: int, config: ml_collections.ConfigDict,
               record: dict, model: experiment.Model, variables: Any, text_params: Any,
               tokenizer: tokenizer_lib.Tokenizer, mesh: jax.sharding.Mesh, batch_size: int):
    self.workdir, self.step, self.config = workdir, step, config
    self.spec = experiment.ModelSpec.from_json(record["spec"])
    self.height, self.width, self.flip = record["height"], record["width"], record["flip"]
    self.batch_size = batch_size
    stems = int(self.spec.vision.get("num_modalities", len(MODALITY_NAMES)))
    self.modalities = tuple(MODALITY_NAMES[m] for m in sorted(MODALITY_NAMES) if m < stems)
    self._model, self._variables, self._text_params = model, variables, text_params
    self._tokenizer, self._mesh = tokenizer, mesh
    self.tokenizer, self.tokenizer_spec = tokenizer, checkpoints.tokenizer_spec(workdir, record)
    self._test_fn = embedding.test_feature_fn(model.eees, self.flip, xla_cpu.compiler_options())
    self._joint_fn = embedding.joint_feature_fn(model.eees)
    self._text_fn = jax.jit(
        lambda p, t: eees_lib.l2_normalize(model.text.apply({"params": p}, t).astype(np.float32)))
    x = jax.ShapeDtypeStruct((1, self.height, self.width, 3), np.uint8)
    m = jax.ShapeDtypeStruct((1,), np.int32)
    self.feature_dim = int(jax.eval_shape(self._test_fn, variables, x, m).shape[-1])
    self.joint_dim = int(jax.eval_shape(self._joint_fn, variables, x, m).shape[-1])
    layout = {"step": step, "spec": record["spec"], "height": self.height, "width": self.width,
              "flip": self.flip, "feature_dim": self.feature_dim, "joint_dim": self.joint_dim,
              "tokenizer": record["tokenizer"]}
    h = hashlib.sha256(json.dumps(layout, sort_keys=True).encode())
    checkpoints.hash_tree(h, jax.device_get(variables))
    checkpoints.hash_tree(h, jax.device_get(text_params))
    self.model_id = h.hexdigest()[:24]

  def __repr__(self) -> str:
    return (f"Embedder({self.workdir!r}, step={self.step}, {self.height}x{self.width}, "
            f"feature_dim={self.feature_dim}, joint_dim={self.joint_dim}, "
            f"model_id={self.model_id!r})")

  def embed_images(self, images: Sequence[str | os.PathLike] | np.ndarray | Sequence[np.ndarray],
                   modality: str | int | Sequence[str | int]) -> np.ndarray:
    """Test-time features float32 [N, feature_dim], exactly as the evaluation computes them.

    images: paths (decoded as the data pipeline decodes), or uint8 RGB arrays: one [N, h, w, 3] or a
      sequence of [h, w, 3], any size (resized as the evaluation resizes).
    modality: 'visible' / 'infrared' (or 0 / 1) for all images, or one per image.
    """
    return self._run(self._test_fn, images, modality, self.feature_dim)

  def joint_of(self, features: np.ndarray) -> np.ndarray:
    """The l2(v) block [N, joint_dim] of test-time features [N, feature_dim] (the unmirrored
    image's v): what embed_joint gives for the same images, without a second forward pass."""
    per_view = self.feature_dim // 2 if self.flip else self.feature_dim
    return features[:, per_view - self.joint_dim:per_view]

  def embed_joint(self, images: Sequence[str | os.PathLike] | np.ndarray | Sequence[np.ndarray],
                  modality: str | int | Sequence[str | int]) -> np.ndarray:
    """l2(v) float32 [N, joint_dim]: the image in CLIP's joint space, comparable with embed_text."""
    return self._run(self._joint_fn, images, modality, self.joint_dim)

  def embed_text(self, sentences: Sequence[str]) -> np.ndarray:
    """Unit text features float32 [N, joint_dim] (tokenised as in training, truncated to context)."""
    if isinstance(sentences, str):
      raise TypeError("sentences must be a sequence of strings, not one string")
    if not len(sentences):
      return np.zeros((0, self.joint_dim), np.float32)
    tokens = self._tokenizer.tokenize(list(sentences))
    return embedding.embed_tokens(self._text_fn, self._text_params, tokens, self.batch_size,
                                  desc="embedding text")

  def image_function(self) -> tuple[Callable[[Any, jax.Array, jax.Array], jax.Array], Any]:
    """(fn, variables): fn(variables, images uint8 [B, height, width, 3], modality int32 [B]) ->
    test-time features [B, feature_dim], CLIP normalisation inside: what embed_images runs on each
    batch, without the CPU compile options, so that eees_jax.export can wrap it in its own jit."""
    return embedding.test_feature_fn(self._model.eees, self.flip), self._variables

  def text_function(self) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
    """(fn, params): fn(params, tokens int32 [B, context_length]) -> unit text features
    [B, joint_dim]: what embed_text runs (tokens from `tokenizer.tokenize`)."""
    return self._text_fn, self._text_params

  # --- internals ---------------------------------------------------------------------------------

  def _run(self, fn, images, modality, dim: int) -> np.ndarray:
    n = len(images)
    if n == 0:
      return np.zeros((0, dim), np.float32)
    modality = _modalities(modality, n)
    lacking = sorted({MODALITY_NAMES[int(m)] for m in modality} - set(self.modalities))
    if lacking:
      raise ValueError(f"this model has stems for {' and '.join(self.modalities)} images only; it "
                       f"cannot embed {' or '.join(lacking)} images")
    # TensorFlow decodes and resizes, as in evaluation; imported only when images are embedded.
    from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
    size = dict(height=self.height, width=self.width, batch_size=self.batch_size)
    if isinstance(images, np.ndarray):
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected a uint8 RGB array [N, H, W, 3], got {images.dtype} "
                         f"{images.shape}")
      batches = input_pipeline.eval_arrays(images, modality, **size)
    elif all(isinstance(x, (str, os.PathLike)) for x in images):
      records = [ImageRecord(path=os.fspath(p), pid=-1, camid=-1, modality=int(m))
                 for p, m in zip(images, modality)]
      batches = input_pipeline.eval_dataset("", records, **size)
    elif all(isinstance(x, np.ndarray) for x in images):
      bad = [i for i, x in enumerate(images)
             if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3]
      if bad:
        raise ValueError(f"images {bad[:10]}: expected uint8 RGB arrays [H, W, 3]")
      batches = input_pipeline.eval_arrays(list(images), modality, **size)
    else:
      raise TypeError("images: expected a list of paths, a uint8 array [N, H, W, 3] or a list of "
                      "uint8 arrays [H, W, 3]")
    feats = list(embedding.run_batches(fn, self._variables, batches, self._mesh))
    return np.concatenate(feats).astype(np.float32)


def _modalities(modality: str | int | Sequence[str | int], n: int) -> np.ndarray:
  """'visible' / 'infrared' / 0 / 1, or one of them per image -> int32 [n]."""
  def one(m):
    if isinstance(m, str) and m in _MODALITIES:
      return _MODALITIES[m]
    if isinstance(m, (int, np.integer)) and not isinstance(m, bool) and m in (VISIBLE, INFRARED):
      return int(m)
    raise ValueError(f"modality {m!r}: expected 'visible' or 'infrared' (or {VISIBLE} / {INFRARED})")
  if isinstance(modality, (str, int, np.integer)):
    return np.full(n, one(modality), np.int32)
  modality = list(modality)
  if len(modality) != n:
    raise ValueError(f"{len(modality)} modalities for {n} images; give one for all or one each")
  return np.asarray([one(m) for m in modality], np.int32)


def _local_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(jax.local_devices()), (sharding.DATA_AXIS,))


def load(workdir: str, step: str | int = "latest", *, batch_size: int | None = None) -> Embedder:
  """The model of `workdir` at `step` ('latest', 'best' by the run's config.eval.best_metric, or a
  step number). batch_size: images / sentences per jitted call (default config.input.
  eval_batch_size, rounded up to a multiple of the local device count); the last batch is padded.

  Raises WorkdirError (a ValueError) for a workdir without checkpoints, an unknown step, a
  checkpoint written before the model record existed, or missing / corrupt workdir files.
  """
  workdir = os.fspath(workdir)
  mngr = checkpoints.open_read_only(workdir)
  try:
    chosen = checkpoints.select_step(mngr, step, workdir)
    meta = checkpoints.read_meta(mngr, chosen)
    record = checkpoints.model_record(meta, workdir, chosen)
    config = ml_collections.ConfigDict(meta.get("config") or {})
    spec = experiment.ModelSpec.from_json(record["spec"])
    model = experiment.build_model(spec)
    mesh = _local_mesh()
    rep = sharding.replicated(mesh)
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(
        lambda: experiment.init_model_variables(model, key, record["height"], record["width"]))
    abstract = {"params": {"model": variables["params"]},
                "batch_stats": variables.get("batch_stats", {})}
    text_in_state = record["text_tower"]["source"] == "state"
    if text_in_state:
      abstract["params"]["text"] = jax.eval_shape(lambda: experiment.init_text_params(model, key))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            abstract)
    try:
      state = checkpoints.restore_subtree(mngr, chosen, abstract)
    except Exception as e:  # orbax raises many types; all mean this step does not fit the record
      raise WorkdirError(f"checkpoint {chosen} of {workdir} does not restore into the model its "
                         f"meta records: {type(e).__name__}: {e}") from e
  finally:
    mngr.close()
  variables = {"params": state["params"]["model"], "batch_stats": state["batch_stats"]}
  if text_in_state:
    text_params = state["params"]["text"]
  else:
    text_params = jax.device_put(checkpoints.read_text_tower(workdir, record), rep)
  tokenizer = tokenizer_lib.build_tokenizer(checkpoints.tokenizer_spec(workdir, record),
                                            context_length=spec.text["context_length"])
  n_dev = mesh.devices.size
  batch_size = int(batch_size or config.get("input", {}).get("eval_batch_size", 64))
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  batch_size = -(-batch_size // n_dev) * n_dev
  return Embedder(workdir=workdir, step=chosen, config=config, record=record, model=model,
                  variables=variables, text_params=text_params, tokenizer=tokenizer, mesh=mesh,
                  batch_size=batch_size)
