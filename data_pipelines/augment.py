"""Training augmentation of the three views (SPEC section 2), as TensorFlow ops on uint8 images.

Every random draw is a `tf.random.stateless_*` op keyed by a per-image seed, so an image's
augmentation depends only on (run seed, global step, position in the global batch): batches are
identical whatever the thread scheduling, the host count, or the step a run resumed from.

Order of operations for one image (uint8 [H, W, 3] already resized to the training size):
  1. channel operation of its view: Vc gets CAJ's ChannelExchange (all three channels replaced by
     one of R, G, B, uniformly); R gets CAJ's ChannelAdapGray (with probability `gray_channel_prob`
     copy one random channel to all three, otherwise with probability `gray_prob` convert to
     grayscale 0.2989 R + 0.5870 G + 0.1140 B, otherwise leave it); V is left as it is.
  2. zero padding by `pad` pixels and a random crop back to (H, W);
  3. horizontal flip with probability `flip`;
  4. random erasing (probability `erasing_prob`; area fraction uniform in `erasing_area`, aspect
     h/w uniform in `erasing_aspect`, up to 100 tries for a rectangle that fits, as in CAJ's
     ChannelRandomErasing) filled with the CLIP mean pixel, which normalises to ~0.
CAJ applies the channel operations last, on normalised tensors; here they run first on raw pixels
(normalisation happens on the device) so that erased pixels are exactly the mean pixel in every
view. Channel operations commute with padding, cropping and flipping, so only that detail differs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from data_pipelines.ops import CLIP_MEAN

VIEW_V = 0   # augmented visible image
VIEW_VC = 1  # channel-exchanged copy of the same visible image
VIEW_R = 2   # augmented infrared image with adaptive gray

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma, as CAJ and PIL use
ERASING_TRIES = 100

# Channel modes: 0 keep, 1..3 copy channel R/G/B to all three, 4 grayscale.
_KEEP, _COPY_R, _GRAY = 0, 1, 4


@dataclasses.dataclass(frozen=True)
class AugConfig:
  """Augmentation settings; defaults are SPEC section 2 and CAJ's ChannelAdapGray(0.5).

  erasing_fill: uint8 RGB of erased pixels; None means the CLIP mean pixel (0 after `normalize`).
  """
  pad: int = 10
  flip: float = 0.5
  erasing_prob: float = 0.5
  erasing_area: tuple[float, float] = (0.02, 0.4)
  erasing_aspect: tuple[float, float] = (0.3, 3.3)
  erasing_fill: tuple[int, int, int] | None = None
  channel_exchange: bool = True
  adaptive_gray: bool = True
  gray_channel_prob: float = 0.75
  gray_prob: float = 0.5

  @classmethod
  def from_mapping(cls, aug: Mapping[str, Any] | AugConfig | None) -> AugConfig:
    """Settings from a config mapping (dict or ConfigDict); missing keys keep their defaults."""
    if aug is None:
      return cls()
    if isinstance(aug, AugConfig):
      return aug
    if hasattr(aug, "to_dict"):
      aug = aug.to_dict()
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(aug) - fields)
    if unknown:
      raise ValueError(f"unknown augmentation settings {unknown}; known: {sorted(fields)}")
    values = dict(aug)
    for key in ("erasing_area", "erasing_aspect", "erasing_fill"):
      if values.get(key) is not None:
        values[key] = tuple(values[key])
    config = cls(**values)
    config.validate()
    return config

  def validate(self) -> None:
    """Rejects settings that would silently do something else than asked."""
    for name in ("flip", "erasing_prob", "gray_channel_prob", "gray_prob"):
      value = getattr(self, name)
      if isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"augmentation setting {name} must be a probability in [0, 1], got {value!r}")
    if isinstance(self.pad, bool) or int(self.pad) != self.pad or self.pad < 0:
      raise ValueError(f"augmentation setting pad must be a non-negative integer, got {self.pad!r}")
    lo, hi = self.erasing_area
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"erasing_area must satisfy 0 < lo <= hi <= 1, got {self.erasing_area!r}")
    lo, hi = self.erasing_aspect
    if not 0.0 < lo <= hi:
      raise ValueError(f"erasing_aspect must satisfy 0 < lo <= hi, got {self.erasing_aspect!r}")
    if self.erasing_fill is not None and (
        len(self.erasing_fill) != 3 or not all(0 <= int(v) <= 255 for v in self.erasing_fill)):
      raise ValueError(f"erasing_fill must be three values in 0..255, got {self.erasing_fill!r}")

  def fill_pixel(self) -> tuple[int, int, int]:
    """uint8 RGB that random erasing writes."""
    if self.erasing_fill is not None:
      return tuple(int(v) for v in self.erasing_fill)
    return tuple(int(round(255.0 * m)) for m in CLIP_MEAN)


def decode_resize(contents: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """Encoded JPEG / PNG / BMP bytes -> uint8 [height, width, 3] RGB.

  JPEGs use libjpeg's accurate integer IDCT, as PIL does (TF's default fast IDCT is off by up to ~7
  levels), so pixels match the PyTorch reference code bases that read images with PIL.
  """
  image = tf.cond(
      tf.io.is_jpeg(contents),
      lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(contents, channels=3, expand_animations=False))
  return resize_uint8(image, height, width)


def resize_uint8(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """uint8 [h, w, 3] -> uint8 [height, width, 3], anti-aliased bilinear, rounded."""
  resized = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def channel_mode(view: tf.Tensor, seed: tf.Tensor, config: AugConfig) -> tf.Tensor:
  """The channel operation (int32 scalar, see _KEEP/_COPY_R/_GRAY) one image of `view` gets."""
  seeds = tf.random.experimental.stateless_split(seed, 3)
  channel = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=3, dtype=tf.int32)
  copy = _COPY_R + channel
  if config.adaptive_gray:
    u_copy = tf.random.stateless_uniform([], seeds[1])
    u_gray = tf.random.stateless_uniform([], seeds[2])
    ir_mode = tf.where(u_copy < config.gray_channel_prob, copy,
                       tf.where(u_gray < config.gray_prob, _GRAY, _KEEP))
  else:
    ir_mode = tf.constant(_KEEP)
  vc_mode = copy if config.channel_exchange else tf.constant(_KEEP)
  view = tf.cast(view, tf.int32)
  return tf.where(view == VIEW_VC, vc_mode, tf.where(view == VIEW_R, ir_mode, _KEEP))


def apply_channel_mode(image: tf.Tensor, mode: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 3] -> uint8 [H, W, 3] with channel operation `mode` applied."""
  shape = image.shape if image.shape.is_fully_defined() else tf.shape(image)

  def copy(c):  # broadcasting a channel is ~3x faster than tf.gather on the channel axis
    return lambda: tf.broadcast_to(image[:, :, c:c + 1], shape)

  def gray():
    luma = tf.tensordot(tf.cast(image, tf.float32), tf.constant(GRAY_WEIGHTS), axes=[[2], [0]])
    luma = tf.cast(tf.clip_by_value(tf.round(luma), 0.0, 255.0), tf.uint8)
    return tf.broadcast_to(luma[:, :, None], shape)

  return tf.switch_case(mode, [lambda: image, copy(0), copy(1), copy(2), gray])


def pad_crop(image: tf.Tensor, pad: int, seed: tf.Tensor) -> tf.Tensor:
  """Zero-pads `pad` pixels on every side, then crops a random window of the original size.

  Computed as a shift by (dy, dx) in [-pad, pad]^2 with zero fill, without the padded image.
  """
  if pad == 0:
    return image
  height, width = image.shape[0], image.shape[1]
  shift = tf.random.stateless_uniform([2], seed, minval=-pad, maxval=pad + 1, dtype=tf.int32)
  dy, dx = shift[0], shift[1]
  kept = tf.slice(image, [tf.maximum(dy, 0), tf.maximum(dx, 0), 0],
                  [height - tf.abs(dy), width - tf.abs(dx), 3])
  shifted = tf.pad(kept, [[tf.maximum(-dy, 0), tf.maximum(dy, 0)],
                          [tf.maximum(-dx, 0), tf.maximum(dx, 0)], [0, 0]])
  return tf.ensure_shape(shifted, image.shape)


def random_flip(image: tf.Tensor, prob: float, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors left-right with probability `prob`."""
  flip = tf.random.stateless_uniform([], seed) < prob
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def random_erasing(image: tf.Tensor, config: AugConfig, seed: tf.Tensor) -> tf.Tensor:
  """CAJ/Zhong random erasing of one rectangle, filled with `config.fill_pixel()`."""
  if config.erasing_prob == 0.0:
    return image
  height, width = image.shape[0], image.shape[1]
  seeds = tf.random.experimental.stateless_split(seed, 5)
  apply = tf.random.stateless_uniform([], seeds[0]) < config.erasing_prob
  area = float(height * width)
  target = tf.random.stateless_uniform([ERASING_TRIES], seeds[1], *config.erasing_area) * area
  aspect = tf.random.stateless_uniform([ERASING_TRIES], seeds[2], *config.erasing_aspect)
  h = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  fits = (h < height) & (w < width)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # first try that fits
  any_fits = tf.reduce_any(fits)
  apply = apply & any_fits
  h = tf.where(any_fits, h[first], 0)  # keeps the offset ranges below valid when nothing fits
  w = tf.where(any_fits, w[first], 0)
  top = tf.random.stateless_uniform([], seeds[3], minval=0, maxval=height - h + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], seeds[4], minval=0, maxval=width - w + 1, dtype=tf.int32)

  def erase():  # slices and concatenation: ~10x faster than a masked tf.where over the image
    band = image[top:top + h]
    block = tf.broadcast_to(tf.constant(config.fill_pixel(), tf.uint8), tf.stack([h, w, 3]))
    band = tf.concat([band[:, :left], block, band[:, left + w:]], axis=1)
    return tf.ensure_shape(tf.concat([image[:top], band, image[top + h:]], axis=0), image.shape)

  return tf.cond(apply, erase, lambda: image)


def augment_view(image: tf.Tensor, view: tf.Tensor, seed: tf.Tensor,
                 config: AugConfig) -> tf.Tensor:
  """One training image: uint8 [H, W, 3] of view V/Vc/R, int64 [2] seed -> uint8 [H, W, 3]."""
  seeds = tf.random.experimental.stateless_split(seed, 4)
  image = apply_channel_mode(image, channel_mode(view, seeds[0], config))
  image = pad_crop(image, int(config.pad), seeds[1])
  image = random_flip(image, float(config.flip), seeds[2])
  image = random_erasing(image, config, seeds[3])
  return tf.ensure_shape(image, [None, None, 3])
