"""Augmentation ops against numpy oracles: shifted windows, channel formulas, rectangles."""
import io

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import augment
from data_pipelines.augment import VIEW_R, VIEW_V, VIEW_VC, AugConfig
from data_pipelines.ops import CLIP_MEAN

H, W = 32, 16


def image(seed=0, low=1):
  return np.random.default_rng(seed).integers(low, 256, (H, W, 3), dtype=np.uint8)


def seed_of(i):
  return tf.constant([17, i], tf.int64)


def test_config_from_mapping():
  assert AugConfig.from_mapping(None) == AugConfig()
  config = AugConfig.from_mapping(ml_collections.ConfigDict(dict(
      pad=4, flip=0.25, erasing_prob=0.5, erasing_area=[0.1, 0.2], erasing_aspect=(0.5, 2.0),
      gray_prob=0.3, channel_exchange=False)))
  assert (config.pad, config.flip, config.erasing_area) == (4, 0.25, (0.1, 0.2))
  assert config.gray_prob == 0.3
  assert not config.channel_exchange and config.adaptive_gray and config.gray_channel_prob == 0.75
  with pytest.raises(ValueError, match="unknown augmentation settings.*'erase_prob'"):
    AugConfig.from_mapping({"erase_prob": 0.5})
  with pytest.raises(ValueError, match="flip must be a probability"):
    AugConfig.from_mapping({"flip": True})
  with pytest.raises(ValueError, match="erasing_area"):
    AugConfig.from_mapping({"erasing_area": (0.5, 0.1)})


def test_default_fill_is_clip_mean_pixel():
  assert AugConfig().fill_pixel() == (123, 117, 104)  # round(255 * CLIP_MEAN)
  assert np.all(np.abs(np.array([123, 117, 104]) / 255 - np.array(CLIP_MEAN)) < 0.5 / 255)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_decode_matches_pil(fmt):
  x = image(3, low=0)
  buf = io.BytesIO()
  Image.fromarray(x).save(buf, format=fmt)
  expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  got = augment.decode_resize(tf.constant(buf.getvalue()), H, W).numpy()
  np.testing.assert_array_equal(got, expected)  # same size: resize is the identity


def test_resize_close_to_pil_bilinear():
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, (10, 5, 3), dtype=np.uint8)
  big = np.asarray(Image.fromarray(coarse).resize((30, 70), Image.BICUBIC))
  expected = np.asarray(Image.fromarray(big).resize((W, H), Image.BILINEAR)).astype(int)
  got = augment.resize_uint8(big, H, W).numpy()
  assert got.dtype == np.uint8 and got.shape == (H, W, 3)
  assert np.abs(got.astype(int) - expected).max() <= 1


def test_channel_modes_against_numpy():
  x = image(1)
  gray = np.round(x.astype(np.float64) @ np.array([0.2989, 0.5870, 0.1140]))
  expected = {0: x, 1: np.repeat(x[:, :, :1], 3, 2), 2: np.repeat(x[:, :, 1:2], 3, 2),
              3: np.repeat(x[:, :, 2:], 3, 2), 4: np.repeat(gray[:, :, None], 3, 2)}
  for mode, want in expected.items():
    got = augment.apply_channel_mode(tf.constant(x), tf.constant(mode)).numpy()
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= (1 if mode == 4 else 0), mode


def test_channel_mode_frequencies():
  n = 800
  config = AugConfig()
  modes = {v: np.array([int(augment.channel_mode(tf.constant(v), seed_of(i), config))
                        for i in range(n)]) for v in (VIEW_V, VIEW_VC, VIEW_R)}
  assert np.all(modes[VIEW_V] == 0)
  assert set(modes[VIEW_VC]) == {1, 2, 3}  # exchange always picks one of R, G, B
  assert all(abs(np.mean(modes[VIEW_VC] == c) - 1 / 3) < 0.06 for c in (1, 2, 3))
  ir = modes[VIEW_R]  # CAJ adaptive gray: 3/4 channel copy, 1/8 grayscale, 1/8 unchanged
  assert abs(np.mean((ir >= 1) & (ir <= 3)) - 0.75) < 0.05
  assert abs(np.mean(ir == 4) - 0.125) < 0.04 and abs(np.mean(ir == 0) - 0.125) < 0.04
  off = AugConfig(channel_exchange=False, adaptive_gray=False)
  assert all(int(augment.channel_mode(tf.constant(v), seed_of(i), off)) == 0
             for v in (VIEW_VC, VIEW_R) for i in range(20))


def test_pad_crop_is_a_shifted_window():
  x = image(2)  # every pixel >= 1, so the zero padding is recognisable
  pad = 3
  padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
  offsets = []
  for i in range(60):
    got = augment.pad_crop(tf.constant(x), pad, seed_of(i)).numpy()
    matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
               if np.array_equal(got, padded[dy:dy + H, dx:dx + W])]
    assert len(matches) == 1
    offsets.append(matches[0])
  offsets = np.array(offsets)
  assert offsets.min() == 0 and offsets.max() == 2 * pad  # the full range is reachable
  np.testing.assert_array_equal(augment.pad_crop(tf.constant(x), 0, seed_of(0)).numpy(), x)


def test_flip():
  x = image(4)
  outs = [augment.random_flip(tf.constant(x), 0.5, seed_of(i)).numpy() for i in range(200)]
  flipped = [np.array_equal(o, x[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o, x) for f, o in zip(flipped, outs))
  assert 0.4 < np.mean(flipped) < 0.6
  assert not any(np.array_equal(augment.random_flip(tf.constant(x), 0.0, seed_of(i)).numpy(),
                                x[:, ::-1]) for i in range(10))


def test_random_erasing_rectangle_geometry():
  x = np.full((64, 32, 3), 7, np.uint8)
  config = AugConfig(erasing_prob=1.0)
  fill = np.array(config.fill_pixel())
  for i in range(100):
    got = augment.random_erasing(tf.constant(x), config, seed_of(i)).numpy()
    erased = np.all(got == fill, axis=2)
    assert np.all(got[~erased] == 7)
    rows, cols = np.nonzero(erased)
    assert rows.size > 0  # p = 1 and a fitting rectangle always exists for these ranges
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert erased.sum() == h * w  # one solid rectangle
    assert h < 64 and w < 32
    # h, w are the rounded sqrt(area * aspect), sqrt(area / aspect): allow half a pixel each.
    slack = (h + w) / 2 + 0.25
    assert 0.02 * 64 * 32 - slack <= h * w <= 0.4 * 64 * 32 + slack
    assert (h - 0.5) / (w + 0.5) <= 3.3 and (h + 0.5) / (w - 0.5) >= 0.3


def test_random_erasing_probability():
  x = image(5)
  outs = [augment.random_erasing(tf.constant(x), AugConfig(), seed_of(i)).numpy()
          for i in range(200)]
  changed = np.mean([not np.array_equal(o, x) for o in outs])
  assert 0.4 < changed < 0.6
  none = AugConfig(erasing_prob=0.0)
  assert all(np.array_equal(augment.random_erasing(tf.constant(x), none, seed_of(i)).numpy(), x)
             for i in range(10))


def test_augment_view_deterministic_and_seed_dependent():
  x = tf.constant(image(6))
  config = AugConfig()
  a = augment.augment_view(x, tf.constant(VIEW_VC), seed_of(1), config).numpy()
  b = augment.augment_view(x, tf.constant(VIEW_VC), seed_of(1), config).numpy()
  c = augment.augment_view(x, tf.constant(VIEW_VC), seed_of(2), config).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == (H, W, 3) and a.dtype == np.uint8


def test_random_erasing_when_no_rectangle_fits():
  x = image(7)
  config = AugConfig(erasing_prob=1.0, erasing_area=(0.99, 1.0), erasing_aspect=(8.0, 9.0))
  for i in range(5):  # h = sqrt(area * aspect) > H on every try: CAJ leaves the image alone
    got = augment.random_erasing(tf.constant(x), config, seed_of(i)).numpy()
    np.testing.assert_array_equal(got, x)
