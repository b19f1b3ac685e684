"""Test-time features from a model and its variables, shared by evaluation and inference.

Images: uint8 batches of a fixed size (the last one padded, with a mask) go through the jitted EEES
embed over a 1-D device mesh, so evaluation and `inference.load(...)` run the same function on the
same pixels and get the same features. Text: fixed-size token batches through the text tower.
Nothing here reads training data or imports training code.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from data_pipelines.ops import CLIP_MEAN, CLIP_STD, normalize
from data_pipelines.records import ImageRecord
from eees_jax import sharding, xla_cpu
from eees_jax.models import eees as eees_lib

ImageFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def test_feature_fn(model: eees_lib.EEES, flip: bool,
                    compiler_options: dict[str, str] | None = None) -> ImageFn:
  """jit(variables, images uint8 [B, H, W, 3], modality int32 [B]) -> [B, D] test-time features
  (SPEC section 1: concat(l2(BN f), l2(v)), and the same of the mirrored image with `flip`).

  compiler_options: XLA's, for a top-level jit (eees_jax/xla_cpu.py); None where the function is
  nested in another jit (export), which cannot take them.
  """
  def embed(variables, images, modality):
    x = normalize(images, CLIP_MEAN, CLIP_STD)
    return model.apply(variables, x, modality, flip=flip, method=eees_lib.EEES.embed)
  return jax.jit(embed, compiler_options=compiler_options)


def joint_feature_fn(model: eees_lib.EEES) -> ImageFn:
  """jit(variables, images, modality) -> [B, Dv]: l2(v), the image side of CLIP's joint space."""
  @jax.jit
  def embed(variables, images, modality):
    x = normalize(images, CLIP_MEAN, CLIP_STD)
    return model.apply(variables, x, modality, method=eees_lib.EEES.embed_joint)
  return embed


def _is_local(mesh: jax.sharding.Mesh) -> bool:
  return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def run_batches(fn: ImageFn, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
                mesh: jax.sharding.Mesh) -> Iterable[np.ndarray]:
  """Features of each batch's real rows, in order.

  batches: {"images" uint8 [B, H, W, 3], "modality" int32 [B], "mask" bool [B]} of one fixed size B
  (a multiple of the mesh size), identical on every process; on a multi-host mesh each process
  feeds its slice of the batch and every process gets all features back.
  """
  local = _is_local(mesh)
  n_proc, proc = (1, 0) if local else (jax.process_count(), jax.process_index())
  for batch in batches:
    share = len(batch["images"]) // n_proc
    part = {k: batch[k][proc * share:(proc + 1) * share] for k in ("images", "modality")}
    g = sharding.host_batch_to_global(part, mesh)
    out = fn(variables, g["images"], g["modality"])
    feats = np.asarray(jax.device_get(out) if local else sharding.to_host(out))
    yield feats[np.asarray(batch["mask"])]


class RecordExtractor:
  """extract(records, images=None) -> test-time features [n, D] (numpy), for the evaluation protocols.

  Images are read as the evaluation pipeline reads them (data_pipelines.input_pipeline.eval_dataset:
  decode, resize to height x width) from `images` (a data set folder, or an image source such as
  data_pipelines.registry.eval_images gives); a call may name another source. Features are cached
  by path, so protocols and the ranked list share passes; each batch's features go to the host as
  they come, and nothing holds more than one batch of images. The variables keep their shardings
  (with FSDP, jit all-gathers the split ones).

  progress: a tqdm bar per call. before_batch: called before every batch (e.g. to stop on a
  preemption; on a multi-host mesh it must do the same on every process). `seconds` and `images`
  count the extraction time and images so far.
  """

  def __init__(self, model: eees_lib.EEES, variables: Any, mesh: jax.sharding.Mesh, *,
               images: Any, height: int, width: int, batch_size: int, flip: bool,
               threads: int | None = None, progress: bool = False,
               before_batch: Callable[[], None] | None = None):
    self._embed = test_feature_fn(model, flip, xla_cpu.compiler_options())
    self._variables, self._mesh, self._images = variables, mesh, images
    self._size = dict(height=height, width=width, batch_size=batch_size, threads=threads)
    self._progress, self._before_batch = progress, before_batch
    self._cache: dict[str, np.ndarray] = {}
    self.seconds, self.images = 0.0, 0

  def __call__(self, records: Sequence[ImageRecord], images: Any = None) -> np.ndarray:
    records = list(records)
    todo = [r for r in dict.fromkeys(records) if r.path not in self._cache]
    if todo:
      # TensorFlow is imported only when images are read (module doc of eees_jax.train).
      from data_pipelines import input_pipeline  # pylint: disable=g-import-not-at-top
      start = time.perf_counter()
      batches = input_pipeline.eval_dataset(self._images if images is None else images, todo,
                                            **self._size)
      if self._before_batch is not None:
        batches = _calling_before(batches, self._before_batch)
      done = 0
      with tqdm(total=len(todo), desc="evaluation: features", unit="image", leave=False,
                disable=not self._progress, dynamic_ncols=True) as bar:
        for feats in run_batches(self._embed, self._variables, batches, self._mesh):
          for r, f in zip(todo[done:done + len(feats)], feats):
            self._cache[r.path] = f
          done += len(feats)
          bar.update(len(feats))
      self.seconds += time.perf_counter() - start
      self.images += len(todo)
    if not records:
      return np.zeros((0, 0), np.float32)
    return np.stack([self._cache[r.path] for r in records])


def _calling_before(batches: Iterable[Any], hook: Callable[[], None]) -> Iterable[Any]:
  for batch in batches:
    hook()
    yield batch


def embed_tokens(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, tokens: np.ndarray,
                 batch_size: int, desc: str = "embedding descriptions") -> np.ndarray:
  """Runs the text tower over `tokens` [n, L] in fixed-size batches; returns float32 [n, D]."""
  fn = jax.jit(apply_fn)
  n = len(tokens)
  out = []
  for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=n <= batch_size):
    chunk = tokens[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:  # fixed shape: one compilation
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(params, jnp.asarray(chunk)))[:batch_size - pad])
  if not out:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(out).astype(np.float32)


def fuse_joint(image_joint: np.ndarray, text: np.ndarray, text_weight: float = 0.5) -> np.ndarray:
  """Query of an image and a sentence together, in CLIP's joint space: float32 [n, D].

  l2((1 - w) l2(a) + w l2(b)) for image features a = l2(v) [n, D] and text features b [n, D] (or
  [1, D], broadcast), w = text_weight in [0, 1]. w = 0.5 is the normalised sum l2(l2(a) + l2(b)):
  cosine with it ranks a gallery by the sum of the cosines with the image and with the sentence.
  w = 0 is the image alone, w = 1 the sentence alone.
  """
  if not 0.0 <= text_weight <= 1.0:
    raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
  def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))
  return unit((1.0 - text_weight) * unit(image_joint) + text_weight * unit(text)).astype(np.float32)
