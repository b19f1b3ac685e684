"""tf.data input pipelines: training batches of three views and evaluation batches (SPEC section 2).

Both pipelines emit uint8 images; the train / eval step normalises them on the device with
`normalize(images, CLIP_MEAN, CLIP_STD)` (data_pipelines/ops.py, re-exported here). Shipping uint8
keeps host work and host-to-device traffic at a quarter of float32.

Images come from the train set's image source (data_pipelines/image_source.py: the files under
the data set folder, or prepared TFDS splits); both give the same bytes, decoded by the same ops.

Training: `train_dataset` turns the AGW sampler's record indices (data_pipelines/sampler.py) into
batches [V | Vc | R] of this host's identities, augmented by data_pipelines/augment.py with
per-image stateless seeds. Everything a batch holds is a function of (seed, global step), so a run
resumed at step s gets exactly the batches s, s+1, ... of an uninterrupted run, and the hosts of a
multi-host run together produce exactly the single-host batch.
"""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from data_pipelines import augment, sampler
from data_pipelines.image_source import ImageSource, as_source
from data_pipelines.ops import CLIP_MEAN, CLIP_STD, normalize
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord, TrainSet
from data_pipelines.sampler import epoch_indices, steps_per_epoch

__all__ = ["CLIP_MEAN", "CLIP_STD", "normalize", "train_dataset", "eval_dataset", "eval_arrays",
           "decode_images", "TrainIterator", "steps_per_epoch", "epoch_indices"]

_DECODE_BATCH = 256
_VIEW_MODALITY = (VISIBLE, VISIBLE, INFRARED)  # modality of the views V, Vc, R


def _options(threads: int | None) -> tf.data.Options:
  """Deterministic order; `threads` (None or 0: TF's default pool) caps the pipeline's threads."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if threads:
    options.threading.private_threadpool_size = int(threads)
  return options


def _parallel(threads: int | None) -> int:
  return int(threads) if threads else tf.data.AUTOTUNE


def _find_bad_images(source: ImageSource, records: Sequence[ImageRecord], height: int,
                     width: int) -> list[str]:
  """Decodes each image eagerly with the pipeline's own ops; returns 'where: reason' for failures."""
  bad = []
  for record in dict.fromkeys(records):  # unique, in order
    where = source.location(record)
    if source.missing(record):
      bad.append(f"{where}: file not found")
      continue
    try:
      augment.decode_resize(tf.constant(source.read_bytes(record)), height, width)
    except tf.errors.OpError as e:
      bad.append(f"{where}: {_reason(e)}")
  return bad


def _reason(error: tf.errors.OpError) -> str:
  """The first line of a TF error without its op / device decorations."""
  message = re.sub(r"\{\{function_node [^}]*\}\}|\s*\[Op:\w+\]", "", error.message).strip()
  return message.splitlines()[0] if message else type(error).__name__


def _pipeline_error(error: tf.errors.OpError, source: ImageSource, records: Sequence[ImageRecord],
                    height: int, width: int, where: str) -> DatasetError:
  """A DatasetError naming the unreadable image(s) among `records`, the inputs of the failing batch."""
  bad = _find_bad_images(source, records, height, width)
  if bad:
    return DatasetError(f"unreadable image(s) among the {where}; fix or remove them from the "
                        "data set:\n  " + "\n  ".join(bad))
  return DatasetError(f"input pipeline failed on the {where}: {_reason(error)}")


def _decoded_batches(source: ImageSource, records: Sequence[ImageRecord], height: int, width: int,
                     batch_size: int, threads: int | None, flip: bool = False,
                     what: str = "images {first}..{last}") -> Iterator[dict[str, np.ndarray]]:
  """Decodes and resizes `records`' images in order: {"images": uint8 [<=batch_size, H, W, 3], ...}."""
  items = source.items(records)

  def load(item):
    image = augment.decode_resize(source.read(item), height, width)
    out = {"images": image}
    if flip:
      out["images_flipped"] = tf.reverse(image, axis=[1])
    return out

  # A generator, not from_tensor_slices: encoded bytes (TFDS) must not become a graph constant.
  dataset = (tf.data.Dataset.from_generator(lambda: iter(items),
                                            output_signature=tf.TensorSpec([], tf.string))
             .map(load, num_parallel_calls=_parallel(threads), deterministic=True)
             .batch(batch_size)
             .prefetch(tf.data.AUTOTUNE)
             .with_options(_options(threads)))
  iterator = dataset.as_numpy_iterator()
  for start in range(0, len(records), batch_size):
    try:
      batch = next(iterator)
    except tf.errors.OpError as e:
      stop = min(start + batch_size, len(records))
      raise _pipeline_error(e, source, records[start:stop], height, width,
                            what.format(first=start, last=stop - 1)) from None
    yield batch


def decode_images(images: str | ImageSource, records: Sequence[ImageRecord], *, height: int,
                  width: int, threads: int | None = None) -> np.ndarray:
  """Every record's image decoded and resized once: uint8 [len(records), height, width, 3].

  images: the data set root folder, or an ImageSource.
  """
  out = np.empty((len(records), height, width, 3), np.uint8)
  start = 0
  for batch in _decoded_batches(as_source(images), list(records), height, width, _DECODE_BATCH,
                                threads,
                                what="images {first}..{last} decoded for the cache"):
    out[start:start + len(batch["images"])] = batch["images"]
    start += len(batch["images"])
  return out


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """numpy batches of `train_dataset`; `dataset` is the underlying tf.data.Dataset.

  step: the global step of the next batch. steps_per_epoch, batch_size: as the sampler and host
  share define them.
  """

  def __init__(self, dataset: tf.data.Dataset, step: int, end_step: int | None,
               steps_per_epoch: int, batch_size: int, step_records, source: ImageSource,
               height: int, width: int):
    self.dataset = dataset
    self.step = step
    self.end_step = end_step
    self.steps_per_epoch = steps_per_epoch
    self.batch_size = batch_size
    self._step_records = step_records
    self._source = source
    self._size = (height, width)
    self._iterator = dataset.as_numpy_iterator()

  def __next__(self) -> dict[str, np.ndarray]:
    if self.end_step is not None and self.step >= self.end_step:
      raise StopIteration
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as e:
      raise _pipeline_error(e, self._source, self._step_records(self.step), *self._size,
                            f"images of training step {self.step}") from None
    self.step += 1
    return batch


class _StepPlan:
  """This host's record indices, views and seeds of each global step (numpy, one epoch cached)."""

  def __init__(self, train_set: TrainSet, P: int, K: int, seed: int, process_index: int,
               process_count: int):
    self.train_set, self.P, self.K, self.seed = train_set, P, K, seed
    self.steps_per_epoch = sampler.steps_per_epoch(train_set, P, K)
    per_host = P // process_count
    self.lo = process_index * per_host * K   # this host's identities fill these positions
    self.hi = self.lo + per_host * K
    b = self.hi - self.lo
    self.view = np.repeat(np.arange(3, dtype=np.int32), b)
    self.modality = np.asarray(_VIEW_MODALITY, np.int32)[self.view]
    # Position in the global batch [V | Vc | R] of 3*P*K images: keys the augmentation seeds.
    self.position = (self.view.astype(np.int64) * P * K
                     + np.tile(np.arange(self.lo, self.hi, dtype=np.int64), 3))
    self.pid = np.asarray([r.pid for r in train_set.records], np.int32)
    self.camid = np.asarray([r.camid for r in train_set.records], np.int32)
    self._epoch, self._indices = None, None
    self._lock = threading.Lock()  # the tf.data thread and, on errors, the caller's thread

  def desc(self, step: int) -> np.ndarray:
    """int64 [3b]: source record of every image of the host's share of `step`, in [V, Vc, R]."""
    epoch, offset = divmod(step, self.steps_per_epoch)
    with self._lock:
      if epoch != self._epoch:
        self._indices = sampler.epoch_indices(self.train_set, self.P, self.K, self.seed, epoch)
        self._epoch = epoch
      visible, infrared = self._indices[offset, :, self.lo:self.hi]
    return np.concatenate([visible, visible, infrared])

  def element(self, step: int) -> dict[str, np.ndarray]:
    """The host's share of `step` as b positions, each [V, Vc, R] (shapes [b, 3] / [b, 3, 2])."""
    desc = self.desc(step)
    seeds = np.stack([np.full(len(desc), self.seed, np.int64),
                      step * 3 * self.P * self.K + self.position], axis=1)
    b = len(desc) // 3

    def by_position(x):  # [3b, ...] in [V | Vc | R] order -> [b, 3, ...]
      return np.swapaxes(x.reshape(3, b, *x.shape[1:]), 0, 1)

    return {"desc": by_position(desc.astype(np.int32)), "labels": by_position(self.pid[desc]),
            "camid": by_position(self.camid[desc]), "modality": by_position(self.modality),
            "view": by_position(self.view), "seed": by_position(seeds)}


def train_dataset(train_set: TrainSet, *, P: int, K: int, height: int, width: int, seed: int,
                  start_step: int = 0, num_steps: int | None = None, process_index: int = 0,
                  process_count: int = 1, aug: Mapping[str, Any] | augment.AugConfig | None = None,
                  threads: int | None = None, cache_decoded: bool = False) -> TrainIterator:
  """Training batches from global step `start_step` on, forever or for `num_steps` steps.

  Each batch is this host's share of one global step: host h takes identities
  [h*P/n, (h+1)*P/n) of the step's P (n = process_count) and emits, with b = P*K/n and B = 3b:
    images   uint8 [B, height, width, 3]  views [V | Vc | R], augmented, NOT normalised (`normalize`
                                          on the device);
    labels   int32 [B]  identity (record pid); the three views of position i share it;
    modality int32 [B]  VISIBLE for V and Vc, INFRARED for R;
    view     int32 [B]  0 V, 1 Vc, 2 R;
    camid    int32 [B]  camera of the source image;
    desc     int32 [B]  record index of the source image (its description); Vc shares V's.
  Global step s belongs to epoch s // steps_per_epoch; a resumed run slices the sampler's indices
  and decodes nothing of the skipped steps. Augmentation is seeded per (seed, step, position in the
  global batch), so results depend neither on threads nor on the host count.

  Decoding matches PIL exactly for JPEG/PNG/BMP; resizing is anti-aliased bilinear (within one
  level of PIL's bilinear resize), then the augmentation of data_pipelines/augment.py.

  threads: parallel decode/augment calls and the pipeline's thread pool; None or 0 = AUTOTUNE.
  cache_decoded: decode and resize every drawable image once into host memory and augment from
    there, as AGW's .npy files do; 3-4x the images/s (BENCHMARKS.md, input_pipeline) at
    height*width*3 bytes an image (124 kB at 288x144). Default False, which needs no memory and no
    start-up time: right for short runs, tests, and hosts short of memory. Turn it on for full
    training runs whenever the cache fits: SYSU-MM01's 34k training images take 4.3 GB at 288x144,
    a RegDB split 0.5 GB, the synthetic set a few MB. Both settings give identical batches.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} must lie in [0, process_count={process_count})")
  if P % process_count:
    raise ValueError(f"P={P} identities per step must divide evenly among {process_count} hosts; "
                     f"choose P as a multiple of the process count")
  if height < 1 or width < 1:
    raise ValueError(f"image size must be positive, got {height}x{width}")
  if start_step < 0 or (num_steps is not None and num_steps < 0):
    raise ValueError(f"start_step and num_steps must be >= 0, got {start_step}, {num_steps}")
  config = augment.AugConfig.from_mapping(aug)
  plan = _StepPlan(train_set, P, K, seed, process_index, process_count)
  batch_size = 3 * (plan.hi - plan.lo)
  end_step = None if num_steps is None else start_step + num_steps
  source = train_set.source

  cache, cache_row = None, None
  if cache_decoded:
    drawable = sorted({int(i) for vis, ir in sampler.identity_pools(train_set).values()
                       for i in (*vis, *ir)})
    logging.info("decoding %d training images into a %.2f GB cache", len(drawable),
                 len(drawable) * height * width * 3 / 1e9)
    cache = decode_images(source, [train_set.records[i] for i in drawable],
                          height=height, width=width, threads=threads)
    cache_row = np.full(len(train_set.records), -1, np.int64)
    cache_row[drawable] = np.arange(len(drawable))

  # What the source reads per record (a path, or the encoded bytes), aligned with the records.
  items = None
  if cache is None:
    items = np.empty(len(train_set.records), object)
    items[:] = source.items(train_set.records)

  def steps():
    step = start_step
    while end_step is None or step < end_step:
      element = plan.element(step)
      # The two sources of each position: visible (V, Vc) and infrared (R).
      if cache is not None:
        element["sources"] = cache[cache_row[element["desc"][:, [0, 2]]]]
      else:
        element["items"] = items[element["desc"][:, [0, 2]]]
      yield element
      step += 1

  b = batch_size // 3
  signature = {key: tf.TensorSpec([b, 3], tf.int32)
               for key in ("desc", "labels", "camid", "modality", "view")}
  signature["seed"] = tf.TensorSpec([b, 3, 2], tf.int64)
  if cache is not None:
    signature["sources"] = tf.TensorSpec([b, 2, height, width, 3], tf.uint8)
  else:
    signature["items"] = tf.TensorSpec([b, 2], tf.string)

  def make_views(position):
    """One position: its visible and infrared source -> images uint8 [3, H, W, 3] (V, Vc, R)."""
    position = dict(position)
    seeds = position.pop("seed")
    if cache is not None:
      visible, infrared = tf.unstack(position.pop("sources"))
    else:  # each source decoded once, for both V and Vc
      visible, infrared = (augment.decode_resize(source.read(item), height, width)
                           for item in tf.unstack(position.pop("items")))
    sources = (visible, visible, infrared)
    position["images"] = tf.stack([
        augment.augment_view(sources[v], position["view"][v], seeds[v], config) for v in range(3)])
    return position

  def view_major(batch):
    """[b, 3, ...] -> [3b, ...]: all V, then all Vc, then all R."""
    return {key: tf.reshape(tf.transpose(value, [1, 0, *range(2, value.shape.rank)]),
                            [batch_size, *value.shape[2:]])
            for key, value in batch.items()}

  dataset = (tf.data.Dataset.from_generator(steps, output_signature=signature)
             .unbatch()
             .map(make_views, num_parallel_calls=_parallel(threads), deterministic=True)
             .batch(b, drop_remainder=True)
             .map(view_major)
             .prefetch(tf.data.AUTOTUNE)
             .with_options(_options(threads)))

  def step_records(step: int) -> list[ImageRecord]:
    return [train_set.records[i] for i in plan.desc(step)]

  return TrainIterator(dataset, start_step, end_step, plan.steps_per_epoch, batch_size,
                       step_records, source, height, width)


def eval_dataset(images: str | ImageSource, records: Sequence[ImageRecord], *, height: int,
                 width: int, batch_size: int, flip: bool = False,
                 threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Test batches in `records` order, resized only (normalise on the device).

  images: the data set root folder, or an ImageSource (data_pipelines.registry.eval_images gives
  the one of an experiment config: its folder, or its prepared TFDS test splits).

  Yields ceil(len(records) / batch_size) batches of fixed size:
    images         uint8 [batch_size, height, width, 3];
    images_flipped uint8 [batch_size, height, width, 3], mirrored left-right (only with flip=True);
    modality       int32 [batch_size];
    mask           bool  [batch_size], False on the padding rows of the last batch, which repeat
                   its last real row (so a single-modality batch stays single-modality).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  source = as_source(images)
  if not records:
    raise DatasetError(f"no records to evaluate in {source.describe()}")
  records = list(records)
  modality = np.asarray([r.modality for r in records], np.int32)
  start = 0
  for batch in _decoded_batches(source, records, height, width, batch_size, threads, flip=flip):
    n = len(batch["images"])
    yield _padded(dict(batch, modality=modality[start:start + n]), batch_size)
    start += n


def _padded(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Adds "mask" and pads a short batch to batch_size by repeating its last real row."""
  n = len(batch["images"])
  out = dict(batch, mask=np.ones(n, bool))
  if n < batch_size:
    pad = np.full(batch_size - n, n - 1)
    out = {key: np.concatenate([value, value[pad]]) for key, value in out.items()}
    out["mask"][n:] = False
  return out


def eval_arrays(images: np.ndarray | Sequence[np.ndarray], modality: Sequence[int], *,
                height: int, width: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """`eval_dataset` for images already in memory: uint8 RGB arrays [h, w, 3] of any size (a
  sequence, or one array [n, h, w, 3]), resized to height x width exactly as eval_dataset resizes a
  decoded file. Yields the same fixed-size batches (images, modality, mask)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  modality = np.asarray(modality, np.int32)
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    resized = np.stack([augment.resize_uint8(tf.constant(image), height, width).numpy()
                        for image in chunk])
    yield _padded({"images": resized, "modality": modality[start:start + len(chunk)]}, batch_size)
