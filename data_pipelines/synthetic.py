"""Synthetic cross-modality pedestrian data set in the exact SYSU-MM01 layout, with descriptions.

Real VI-ReID data sets are licensed and cannot be downloaded automatically; this generator gives
the project a benchmark that runs end to end on a laptop CPU (SPEC section 6).

  python -m data_pipelines.synthetic --out DIR [--num_ids 120 --images_per_camera 5
      --height 128 --width 64 --seed 0 --workers 1 --overwrite]

Writes, under DIR:
  cam1 .. cam6/<pid:04d>/<n:04d>.jpg     visible cameras 1, 2, 4, 5 (RGB); infrared 3, 6 (R = G = B)
  exp/train_id.txt, val_id.txt, test_id.txt   one line of comma-separated ids each
  descriptions.jsonl                     one imitation-VLM description per image (train and test)
  synthetic.json                         the settings and every identity's ground-truth attributes

What makes it a cross-modality problem:
- Identities share a body plan and differ by attributes drawn from small vocabularies, so two
  people often match on several cues. Shape cues (gender-ish build, height, hair length, sleeve
  length, lower garment type, shoes, bag) are seen by both modalities.
- Colour (clothes, shoes, bag, hair) is the strongest visible cue and is absent in infrared, which
  renders heat and material: skin and hair warm, each fabric its own gray level whatever its
  colour, cool noisy background. Materials are a weaker infrared cue shared by many identities.
- Every image varies: position, scale, view (front/back/side), limb swing, camera-specific
  lighting, white balance, blur, noise and JPEG quality, cluttered backgrounds, occasional
  occluders. Identities are missing from some cameras.
- Descriptions are correct for visible images; for infrared images each colour word is, with the
  default rates, missing half of the time and wrong a quarter of the time, as a VLM guessing colours
  from a thermal image would be.

Output is byte-identical for a given seed and settings (each image has its own random stream,
so the number of workers does not change the result).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from data_pipelines import descriptions as descriptions_lib
from data_pipelines.records import DatasetError

GENERATOR = "data_pipelines.synthetic"
VERSION = 1
MARKER = "synthetic.json"
VAL_FRACTION = 0.05  # share of ids in exp/val_id.txt unless asked otherwise
DESCRIPTIONS = "descriptions.jsonl"
CAPTIONER = "synthetic-captioner-v1"
VISIBLE_PROMPT = ("Describe the pedestrian in one sentence: gender, build, hair, upper clothing, lower "
                  "clothing, shoes and belongings, with colours.")
INFRARED_PROMPT = ("This is an infrared image. Describe the pedestrian in one sentence: gender, build, "
                   "hair, upper clothing, lower clothing, shoes and belongings.")
VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
CAMERAS = (1, 2, 3, 4, 5, 6)

# ---------------------------------------------------------------------------------------------
# Vocabularies: small on purpose, with skewed weights, so attribute collisions are frequent.

COLOURS = {  # name -> linear-ish RGB in [0, 1]
    "black": (0.09, 0.09, 0.10), "white": (0.92, 0.92, 0.90), "gray": (0.50, 0.50, 0.52),
    "red": (0.75, 0.12, 0.14), "blue": (0.14, 0.25, 0.66), "green": (0.16, 0.50, 0.24),
    "yellow": (0.90, 0.78, 0.16), "pink": (0.92, 0.56, 0.68), "purple": (0.45, 0.22, 0.56),
    "orange": (0.93, 0.48, 0.12), "brown": (0.45, 0.29, 0.16), "blonde": (0.80, 0.68, 0.40),
}
UPPER_COLOURS = {"black": 20, "white": 15, "gray": 12, "red": 10, "blue": 13, "green": 8, "yellow": 6,
                 "pink": 6, "purple": 4, "orange": 4, "brown": 2}
LOWER_COLOURS = {"black": 35, "blue": 30, "gray": 15, "brown": 8, "white": 7, "red": 5}
SHOE_COLOURS = {"black": 45, "white": 35, "brown": 12, "gray": 8}
BAG_COLOURS = {"black": 40, "brown": 20, "gray": 10, "red": 10, "blue": 10, "pink": 10}
HAIR_COLOURS = {"black": 60, "brown": 25, "blonde": 10, "gray": 5}
SKIN_TONES = ((0.93, 0.78, 0.66), (0.80, 0.60, 0.46), (0.55, 0.38, 0.27), (0.96, 0.84, 0.74))
# Every colour word a description can use for a colour slot (hair colours included).
COLOUR_WORDS = tuple(COLOURS)

UPPER_NOUNS = {("short", "cotton"): "t-shirt", ("short", "synthetic"): "sports shirt",
               ("long", "cotton"): "long-sleeved shirt", ("long", "wool"): "sweater",
               ("long", "synthetic"): "jacket", ("long", "leather"): "leather jacket"}
UPPER_MATERIALS = {"short": {"cotton": 70, "synthetic": 30},
                   "long": {"cotton": 35, "wool": 25, "synthetic": 25, "leather": 15}}
LOWER_NOUNS = {("trousers", "denim"): "jeans", ("trousers", "cotton"): "trousers",
               ("trousers", "synthetic"): "track pants", ("shorts", "denim"): "denim shorts",
               ("shorts", "cotton"): "shorts", ("shorts", "synthetic"): "sports shorts",
               ("skirt", "cotton"): "skirt", ("skirt", "denim"): "denim skirt"}
LOWER_MATERIALS = {"trousers": {"denim": 50, "cotton": 35, "synthetic": 15},
                   "shorts": {"denim": 30, "cotton": 40, "synthetic": 30},
                   "skirt": {"cotton": 60, "denim": 40}}
SHOE_MATERIALS = {"sneakers": "canvas", "boots": "leather"}
BAG_MATERIALS = {"backpack": {"nylon": 80, "leather": 20}, "handbag": {"leather": 70, "nylon": 30}}
# Infrared gray level of each material (a heat/reflectance proxy), independent of colour.
HEAT = {"skin": 0.86, "hair": 0.72, "cotton": 0.58, "synthetic": 0.66, "wool": 0.46, "leather": 0.34,
        "denim": 0.50, "canvas": 0.42, "nylon": 0.44}
HAIR_WORDS = {"short": "short", "medium": "shoulder-length", "long": "long"}
BUILD_WIDTH = {"slim": 0.84, "medium": 1.0, "heavy": 1.22}
HEIGHT_SCALE = {"short": 0.91, "average": 1.0, "tall": 1.08}
VIEWS = {"front": 45, "back": 40, "side": 15}


@dataclasses.dataclass(frozen=True)
class Camera:
  """Per-camera imaging conditions; SYSU-MM01 cameras 1-3 are indoor, 4-6 outdoor."""
  infrared: bool
  upper_bg: tuple[float, ...]  # Wall / sky colour (visible) or level (infrared).
  lower_bg: tuple[float, ...]  # Floor / ground.
  white_balance: tuple[float, float, float]
  gain: float
  blur: float  # Gaussian sigma in pixels at 128 px image height.
  noise: float
  quality: int  # JPEG quality.


CAMERA_SETTINGS = {
    1: Camera(False, (0.78, 0.74, 0.66), (0.45, 0.40, 0.36), (1.06, 1.0, 0.90), 1.00, 0.6, 0.015, 90),
    2: Camera(False, (0.60, 0.65, 0.72), (0.35, 0.35, 0.38), (0.92, 1.0, 1.08), 0.85, 0.9, 0.025, 85),
    3: Camera(True, (0.28,), (0.22,), (1.0, 1.0, 1.0), 1.00, 1.0, 0.030, 88),
    4: Camera(False, (0.58, 0.63, 0.68), (0.42, 0.42, 0.40), (1.00, 1.0, 1.00), 1.10, 0.5, 0.012, 92),
    5: Camera(False, (0.70, 0.60, 0.50), (0.50, 0.48, 0.42), (1.08, 1.0, 0.92), 1.00, 0.8, 0.020, 88),
    6: Camera(True, (0.20,), (0.26,), (1.0, 1.0, 1.0), 1.15, 1.3, 0.040, 85),
}


@dataclasses.dataclass(frozen=True)
class Identity:
  """Ground-truth attributes of one synthetic person (written to synthetic.json)."""
  pid: int
  split: str  # "train", "val" or "test"
  cameras: tuple[int, ...]
  gender: str  # "man" | "woman"
  build: str
  height: str
  skin: int
  hair_length: str
  hair_colour: str
  sleeve: str  # "short" | "long"
  upper_material: str
  upper_colour: str
  upper_pattern: str  # "plain" | "striped" (stripes are colour only: invisible in infrared)
  stripe_colour: str
  lower_type: str  # "trousers" | "shorts" | "skirt"
  lower_material: str
  lower_colour: str
  shoes: str  # "sneakers" | "boots"
  shoe_colour: str
  bag: str  # "none" | "backpack" | "handbag"
  bag_material: str
  bag_colour: str
  shade: tuple[float, float, float]  # Per-person dye shade of the clothes (visible).
  warmth: float  # Per-person infrared offset (clothing thickness, fit).

  @property
  def upper_noun(self) -> str:
    return UPPER_NOUNS[(self.sleeve, self.upper_material)]

  @property
  def lower_noun(self) -> str:
    return LOWER_NOUNS[(self.lower_type, self.lower_material)]


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
  names = list(weights)
  p = np.asarray([weights[n] for n in names], dtype=np.float64)
  return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_identity(seed: int, pid: int, split: str) -> Identity:
  """Draws one person's attributes from its own random stream (independent of the others)."""
  rng = np.random.default_rng([seed, 1, pid])
  gender = _choice(rng, {"man": 50, "woman": 50})
  man = gender == "man"
  hair_length = _choice(rng, {"short": 75, "medium": 20, "long": 5} if man else
                        {"short": 15, "medium": 35, "long": 50})
  sleeve = _choice(rng, {"short": 50, "long": 50})
  lower_type = _choice(rng, {"trousers": 75, "shorts": 25} if man else
                       {"trousers": 50, "shorts": 15, "skirt": 35})
  bag = _choice(rng, {"none": 50, "backpack": 38, "handbag": 12} if man else
                {"none": 35, "backpack": 25, "handbag": 40})
  upper_colour = _choice(rng, UPPER_COLOURS)
  stripes = ("white", "black", "red", "blue", "yellow")
  stripe_colour = _choice(rng, {c: 1 for c in stripes if c != upper_colour})
  shoes = _choice(rng, {"sneakers": 65, "boots": 35})
  cameras = [c for c in VISIBLE_CAMERAS if rng.random() < 0.75]
  cameras += [c for c in INFRARED_CAMERAS if rng.random() < 0.8]
  if not any(c in VISIBLE_CAMERAS for c in cameras):
    cameras.append(VISIBLE_CAMERAS[int(rng.integers(4))])
  if not any(c in INFRARED_CAMERAS for c in cameras):
    cameras.append(INFRARED_CAMERAS[int(rng.integers(2))])
  return Identity(
      pid=pid, split=split, cameras=tuple(sorted(cameras)), gender=gender,
      build=_choice(rng, {"slim": 30, "medium": 50, "heavy": 20}),
      height=_choice(rng, {"short": 25, "average": 50, "tall": 25}),
      skin=int(rng.integers(len(SKIN_TONES))), hair_length=hair_length,
      hair_colour=_choice(rng, HAIR_COLOURS), sleeve=sleeve,
      upper_material=_choice(rng, UPPER_MATERIALS[sleeve]), upper_colour=upper_colour,
      upper_pattern=_choice(rng, {"plain": 80, "striped": 20}), stripe_colour=stripe_colour,
      lower_type=lower_type, lower_material=_choice(rng, LOWER_MATERIALS[lower_type]),
      lower_colour=_choice(rng, LOWER_COLOURS), shoes=shoes, shoe_colour=_choice(rng, SHOE_COLOURS),
      bag=bag, bag_material=_choice(rng, BAG_MATERIALS[bag]) if bag != "none" else "none",
      bag_colour=_choice(rng, BAG_COLOURS) if bag != "none" else "none",
      shade=tuple(float(s) for s in rng.uniform(0.9, 1.1, 3)), warmth=float(rng.normal(0.0, 0.03)))


def assign_splits(seed: int, num_ids: int, val_fraction: float = VAL_FRACTION) -> dict[int, str]:
  """Ids 1..num_ids -> split: about a third test, `val_fraction` val, the rest train.

  The test ids do not depend on `val_fraction` (they come first in the permutation), and the
  standard protocol trains on train + val, so `val_fraction` only decides how many training
  identities a held-out validation run (config.dataset.holdout) keeps aside.
  """
  if num_ids < 3:
    raise ValueError(f"num_ids must be at least 3 (train, val and test each need one), got {num_ids}")
  num_test = max(1, round(num_ids / 3))
  num_val = max(1, round(num_ids * val_fraction))
  if not 0.0 < val_fraction < 1.0 or num_test + num_val >= num_ids:
    raise ValueError(f"val_fraction={val_fraction} leaves no training identity out of {num_ids} "
                     f"({num_test} test, {num_val} val)")
  order = np.random.default_rng([seed, 0]).permutation(np.arange(1, num_ids + 1))
  splits = {}
  for i, pid in enumerate(order.tolist()):
    splits[pid] = "test" if i < num_test else "val" if i < num_test + num_val else "train"
  return splits


# ---------------------------------------------------------------------------------------------
# Rendering: soft-edged primitives alpha-blended into a float canvas of C channels.

class _Canvas:
  """A (H, W, C) float32 image with anti-aliased shape drawing restricted to each shape's box."""

  def __init__(self, image: np.ndarray):
    self.image = image
    self.h, self.w = image.shape[:2]

  def _window(self, x0: float, x1: float, y0: float, y1: float):
    ix0, ix1 = max(int(math.floor(x0)) - 1, 0), min(int(math.ceil(x1)) + 2, self.w)
    iy0, iy1 = max(int(math.floor(y0)) - 1, 0), min(int(math.ceil(y1)) + 2, self.h)
    if ix0 >= ix1 or iy0 >= iy1:
      return None
    ys = np.arange(iy0, iy1, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(ix0, ix1, dtype=np.float32)[None, :] + 0.5
    return slice(iy0, iy1), slice(ix0, ix1), ys, xs

  def _blend(self, window, alpha: np.ndarray, value: np.ndarray) -> None:
    region = self.image[window[0], window[1]]
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * value

  def ellipse(self, cx: float, cy: float, rx: float, ry: float, value: np.ndarray) -> None:
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    window = self._window(cx - rx, cx + rx, cy - ry, cy + ry)
    if window is None:
      return
    _, _, ys, xs = window
    d = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2)
    self._blend(window, np.clip((1.0 - d) * min(rx, ry) + 0.5, 0.0, 1.0), value)

  def capsule(self, a: Sequence[float], b: Sequence[float], r0: float, r1: float,
              value: np.ndarray) -> None:
    """A segment from a to b whose radius goes from r0 to r1 (limbs)."""
    r = max(r0, r1)
    window = self._window(min(a[0], b[0]) - r, max(a[0], b[0]) + r, min(a[1], b[1]) - r,
                          max(a[1], b[1]) + r)
    if window is None:
      return
    _, _, ys, xs = window
    dx, dy = b[0] - a[0], b[1] - a[1]
    t = np.clip(((xs - a[0]) * dx + (ys - a[1]) * dy) / max(dx * dx + dy * dy, 1e-6), 0.0, 1.0)
    dist = np.sqrt((xs - a[0] - t * dx) ** 2 + (ys - a[1] - t * dy) ** 2)
    self._blend(window, np.clip(r0 + t * (r1 - r0) - dist + 0.5, 0.0, 1.0), value)

  def polygon(self, points: Sequence[Sequence[float]], value: np.ndarray) -> None:
    """A convex polygon (vertices in either orientation)."""
    pts = np.asarray(points, dtype=np.float32)
    window = self._window(pts[:, 0].min(), pts[:, 0].max(), pts[:, 1].min(), pts[:, 1].max())
    if window is None:
      return
    _, _, ys, xs = window
    nxt = np.roll(pts, -1, axis=0)
    area = float(np.sum(pts[:, 0] * nxt[:, 1] - nxt[:, 0] * pts[:, 1]))
    sign = 1.0 if area > 0 else -1.0
    inside = None
    for (x0, y0), (x1, y1) in zip(pts, nxt):
      length = math.hypot(x1 - x0, y1 - y0)
      if length < 1e-6:
        continue
      d = sign * ((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)) / length
      inside = d if inside is None else np.minimum(inside, d)
    if inside is not None:
      self._blend(window, np.clip(inside + 0.5, 0.0, 1.0), value)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of a (H, W, C) image with reflected borders."""
  if sigma < 0.3:
    return image
  radius = max(1, int(math.ceil(2.5 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)
  for axis in (0, 1):
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(image, pad, mode="reflect")
    n = image.shape[axis]
    out = np.zeros_like(image)
    for k, w in enumerate(taps):
      out += w * np.take(padded, np.arange(k, k + n), axis=axis)
    image = out
  return image


@dataclasses.dataclass(frozen=True)
class ImagePlan:
  """Per-image choices both the renderer and the captioner need."""
  view: str  # "front" | "back" | "side"
  facing: int  # +1 / -1: which side a side view faces, which hand holds a handbag.


def image_plan(seed: int, pid: int, camid: int, index: int) -> ImagePlan:
  rng = np.random.default_rng([seed, 4, pid, camid, index])
  return ImagePlan(view=_choice(rng, VIEWS), facing=1 if rng.random() < 0.5 else -1)


def _background(rng: np.random.Generator, camera: Camera, h: int, w: int) -> np.ndarray:
  """Camera scene: wall/floor (or sky/ground) split, clutter boxes, low-frequency texture."""
  channels = 1 if camera.infrared else 3
  upper = np.asarray(camera.upper_bg, np.float32) * rng.uniform(0.85, 1.15)
  lower = np.asarray(camera.lower_bg, np.float32) * rng.uniform(0.85, 1.15)
  horizon = h * rng.uniform(0.45, 0.7)
  rows = np.arange(h, dtype=np.float32)[:, None, None]
  mix = np.clip((rows - horizon) / 3.0 + 0.5, 0.0, 1.0)
  image = np.broadcast_to(upper * (1 - mix) + lower * mix, (h, w, channels)).astype(np.float32)
  canvas = _Canvas(image)
  for _ in range(int(rng.integers(3, 7))):
    x0, y0 = rng.uniform(-0.2 * w, w), rng.uniform(-0.1 * h, h * 0.8)
    bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.05, 0.4) * h
    if camera.infrared:
      level = rng.uniform(0.55, 0.7) if rng.random() < 0.1 else rng.uniform(0.08, 0.42)
      value = np.asarray([level], np.float32)
    else:
      value = np.clip(upper * rng.uniform(0.5, 1.3, 3) + rng.normal(0, 0.06, 3), 0, 1).astype(np.float32)
    canvas.polygon([(x0, y0), (x0 + bw, y0), (x0 + bw, y0 + bh), (x0, y0 + bh)], value)
  coarse = rng.normal(0.0, 0.04, (h // 16 + 2, w // 16 + 2)).astype(np.float32)
  texture = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))
  return image + texture[..., None]


def _values(identity: Identity, camera: Camera, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Pixel value of every body part: RGB colour (visible) or heat level (infrared)."""
  if camera.infrared:
    warm = identity.warmth
    levels = {
        "skin": HEAT["skin"] + rng.normal(0, 0.02), "hair": HEAT["hair"] + rng.normal(0, 0.02),
        "upper": HEAT[identity.upper_material] + warm, "stripe": HEAT[identity.upper_material] + warm,
        "lower": HEAT[identity.lower_material] + warm,
        "shoes": HEAT[SHOE_MATERIALS[identity.shoes]],
        "bag": HEAT.get(identity.bag_material, 0.0)}
    return {k: np.asarray([v], np.float32) for k, v in levels.items()}
  shade = np.asarray(identity.shade, np.float32)

  def dyed(name: str) -> np.ndarray:
    return np.clip(np.asarray(COLOURS[name], np.float32) * shade, 0.0, 1.0)

  return {"skin": np.asarray(SKIN_TONES[identity.skin], np.float32),
          "hair": np.asarray(COLOURS[identity.hair_colour], np.float32),
          "upper": dyed(identity.upper_colour), "stripe": dyed(identity.stripe_colour),
          "lower": dyed(identity.lower_colour), "shoes": dyed(identity.shoe_colour),
          "bag": dyed(identity.bag_colour) if identity.bag != "none" else np.zeros(3, np.float32)}


def _draw_person(canvas: _Canvas, identity: Identity, plan: ImagePlan, values: dict[str, np.ndarray],
                 rng: np.random.Generator, infrared: bool) -> None:
  """Draws one pedestrian: limbs as tapered capsules, torso and skirt as polygons."""
  h, w = canvas.h, canvas.w
  fh = h * 0.8 * HEIGHT_SCALE[identity.height] * rng.uniform(0.93, 1.05)  # Figure height (px).
  cx = w / 2 + rng.normal(0, 0.06 * w)
  foot = h * rng.uniform(0.93, 1.0)
  top = foot - fh

  def y(fraction: float) -> float:
    return top + fraction * fh

  man = identity.gender == "man"
  build = BUILD_WIDTH[identity.build]
  squeeze = 0.62 if plan.view == "side" else 1.0
  shoulder = fh * (0.115 if man else 0.100) * build * squeeze
  hip = fh * (0.085 if man else 0.097) * build * squeeze
  lean = rng.normal(0, 0.01 * fh)
  limb = fh * 0.030 * math.sqrt(build)
  leg = fh * 0.036 * build ** 0.6
  head = (cx + lean, y(0.075))
  head_rx, head_ry = fh * 0.048, fh * 0.064
  front = plan.view == "front"
  back = plan.view == "back"

  # Hair behind the head and shoulders (front/side views show it beside the neck).
  if identity.hair_length != "short" and not back:
    bottom = y(0.13 if identity.hair_length == "medium" else 0.27)
    offset = -plan.facing * head_rx * 0.4 if plan.view == "side" else 0.0
    hair_x = head[0] + offset
    canvas.polygon([(hair_x - head_rx * 1.15, head[1]), (hair_x + head_rx * 1.15, head[1]),
                    (hair_x + head_rx * 1.25, bottom), (hair_x - head_rx * 1.25, bottom)], values["hair"])
  # Backpack seen from the side sticks out behind the torso.
  if identity.bag == "backpack" and plan.view == "side":
    bx = cx - plan.facing * shoulder * 1.6
    canvas.polygon([(bx - fh * 0.05, y(0.19)), (bx + fh * 0.05, y(0.19)), (bx + fh * 0.055, y(0.44)),
                    (bx - fh * 0.055, y(0.44))], values["bag"])

  # Legs: hip -> knee -> ankle with a stride; lower clothing over the skin.
  stride = rng.uniform(-0.28, 0.28) * (1.6 if plan.view == "side" else 1.0)
  ankles = []
  for side in (-1, 1):
    hx = cx + side * hip * 0.48
    swing = stride * side
    knee = (hx + math.sin(swing) * fh * 0.23, y(0.52) + math.cos(swing) * fh * 0.23)
    ankle = (knee[0] + math.sin(swing * 0.5) * fh * 0.22, min(knee[1] + math.cos(swing * 0.5) * fh * 0.22,
                                                             y(0.97)))
    ankles.append(ankle)
    canvas.capsule((hx, y(0.52)), knee, leg, leg * 0.85, values["skin"])
    canvas.capsule(knee, ankle, leg * 0.85, leg * 0.65, values["skin"])
    if identity.lower_type == "trousers":
      canvas.capsule((hx, y(0.52)), knee, leg * 1.1, leg * 0.95, values["lower"])
      canvas.capsule(knee, ankle, leg * 0.95, leg * 0.8, values["lower"])
    elif identity.lower_type == "shorts":
      mid = (hx + (knee[0] - hx) * 0.7, y(0.52) + (knee[1] - y(0.52)) * 0.7)
      canvas.capsule((hx, y(0.52)), mid, leg * 1.2, leg * 1.15, values["lower"])
  for ax, ay in ankles:  # Shoes (boots reach up the shin).
    if identity.shoes == "boots":
      canvas.capsule((ax, ay - fh * 0.07), (ax, ay), leg * 0.8, leg * 0.8, values["shoes"])
    toe = plan.facing * fh * 0.015 if plan.view == "side" else 0.0
    canvas.ellipse(ax + toe, ay + fh * 0.008, fh * 0.042, fh * 0.022, values["shoes"])

  # Pelvis (trousers, shorts) or skirt.
  if identity.lower_type == "skirt":
    canvas.polygon([(cx - hip * 1.02, y(0.48)), (cx + hip * 1.02, y(0.48)), (cx + hip * 1.7, y(0.74)),
                    (cx - hip * 1.7, y(0.74))], values["lower"])
  else:
    canvas.polygon([(cx - hip * 1.05, y(0.47)), (cx + hip * 1.05, y(0.47)), (cx + hip * 1.05, y(0.58)),
                    (cx - hip * 1.05, y(0.58))], values["lower"])

  # Arms behind the torso in a side view; in front of its sides otherwise.
  swing = rng.normal(0, 0.22) * (1.5 if plan.view == "side" else 1.0)
  hands = []

  def arm(side: int) -> None:
    sx = cx + lean + side * (shoulder - limb * 0.6)
    sy = y(0.19)
    angle = swing * side + side * 0.08
    elbow = (sx + math.sin(angle) * fh * 0.16, sy + math.cos(angle) * fh * 0.16)
    bend = angle + side * rng.uniform(0.0, 0.25)
    hand = (elbow[0] + math.sin(bend) * fh * 0.15, elbow[1] + math.cos(bend) * fh * 0.15)
    hands.append(hand)
    canvas.capsule((sx, sy), elbow, limb, limb * 0.9, values["skin"])
    canvas.capsule(elbow, hand, limb * 0.9, limb * 0.75, values["skin"])
    if identity.sleeve == "long":
      canvas.capsule((sx, sy), elbow, limb * 1.12, limb * 1.0, values["upper"])
      canvas.capsule(elbow, hand, limb * 1.0, limb * 0.9, values["upper"])
    else:
      mid = (sx + (elbow[0] - sx) * 0.55, sy + (elbow[1] - sy) * 0.55)
      canvas.capsule((sx, sy), mid, limb * 1.2, limb * 1.15, values["upper"])
    canvas.ellipse(hand[0], hand[1] + limb * 0.5, limb * 0.85, limb * 1.1, values["skin"])

  if plan.view == "side":
    arm(-plan.facing)
  # Neck and torso.
  canvas.capsule((head[0], y(0.11)), (cx + lean, y(0.19)), fh * 0.022, fh * 0.024, values["skin"])
  torso = [(cx + lean - shoulder, y(0.17)), (cx + lean + shoulder, y(0.17)), (cx + hip, y(0.5)),
           (cx - hip, y(0.5))]
  canvas.polygon(torso, values["upper"])
  canvas.ellipse(cx + lean - shoulder * 0.9, y(0.19), limb * 1.3, limb * 1.1, values["upper"])
  canvas.ellipse(cx + lean + shoulder * 0.9, y(0.19), limb * 1.3, limb * 1.1, values["upper"])
  if identity.upper_pattern == "striped" and not infrared:  # Colour-only detail.
    period = max(fh * 0.045, 2.0)
    yy = y(0.2)
    while yy + period / 2 < y(0.49):
      ta, tb = (yy - y(0.17)) / (0.33 * fh), (yy + period / 2 - y(0.17)) / (0.33 * fh)
      wa, wb = shoulder + (hip - shoulder) * ta, shoulder + (hip - shoulder) * tb
      la, lb = lean * (1 - ta), lean * (1 - tb)
      canvas.polygon([(cx + la - wa, yy), (cx + la + wa, yy), (cx + lb + wb, yy + period / 2),
                      (cx + lb - wb, yy + period / 2)], values["stripe"])
      yy += period
  if identity.bag == "backpack":
    if back:
      canvas.polygon([(cx + lean - shoulder * 0.75, y(0.2)), (cx + lean + shoulder * 0.75, y(0.2)),
                      (cx + shoulder * 0.8, y(0.45)), (cx - shoulder * 0.8, y(0.45))], values["bag"])
    elif front:
      for side in (-1, 1):
        canvas.capsule((cx + lean + side * shoulder * 0.55, y(0.175)), (cx + side * shoulder * 0.6, y(0.4)),
                       limb * 0.35, limb * 0.35, values["bag"])
  if plan.view == "side":
    arm(plan.facing)
  else:
    arm(-1)
    arm(1)
  if identity.bag == "handbag":
    hx, hy = hands[0] if plan.facing < 0 else hands[-1]
    canvas.capsule((hx, hy), (hx, hy + fh * 0.03), limb * 0.3, limb * 0.3, values["bag"])
    canvas.polygon([(hx - fh * 0.045, hy + fh * 0.03), (hx + fh * 0.045, hy + fh * 0.03),
                    (hx + fh * 0.05, hy + fh * 0.11), (hx - fh * 0.05, hy + fh * 0.11)], values["bag"])

  # Head and hair.
  if back:
    canvas.ellipse(head[0], head[1], head_rx, head_ry, values["hair"])
    if identity.hair_length != "short":
      bottom = y(0.13 if identity.hair_length == "medium" else 0.27)
      canvas.polygon([(head[0] - head_rx * 1.05, head[1]), (head[0] + head_rx * 1.05, head[1]),
                      (head[0] + head_rx * 1.2, bottom), (head[0] - head_rx * 1.2, bottom)], values["hair"])
  else:
    canvas.ellipse(head[0], head[1], head_rx, head_ry, values["skin"])
    cap_x = head[0] - (plan.facing * head_rx * 0.3 if plan.view == "side" else 0.0)
    canvas.ellipse(cap_x, head[1] - head_ry * 0.45, head_rx * 1.08, head_ry * 0.62, values["hair"])


def render_image(identity: Identity, camid: int, index: int, height: int, width: int,
                 seed: int) -> np.ndarray:
  """Renders image `index` of `identity` in camera `camid`.

  Returns: (height, width, 3) uint8; for infrared cameras the three channels are equal.
  """
  camera = CAMERA_SETTINGS[camid]
  rng = np.random.default_rng([seed, 2, identity.pid, camid, index])
  plan = image_plan(seed, identity.pid, camid, index)
  image = _background(rng, camera, height, width)
  canvas = _Canvas(image)
  _draw_person(canvas, identity, plan, _values(identity, camera, rng), rng, camera.infrared)
  if rng.random() < 0.15:  # Occluder: a railing/bench across the legs or a pole.
    if camera.infrared:
      value = np.asarray([rng.uniform(0.12, 0.4)], np.float32)
    else:
      value = np.clip(np.asarray(camera.lower_bg, np.float32) * rng.uniform(0.5, 1.4, 3), 0, 1)
    if rng.random() < 0.5:
      y0 = height * rng.uniform(0.62, 0.82)
      canvas.polygon([(0, y0), (width, y0), (width, height), (0, height)], value)
    else:
      x0 = width * rng.uniform(0.15, 0.75)
      bar = width * rng.uniform(0.1, 0.22)
      canvas.polygon([(x0, 0), (x0 + bar, 0), (x0 + bar, height), (x0, height)], value)
  rows = np.arange(height, dtype=np.float32)[:, None, None] / height - 0.5
  light = 1.0 + rng.uniform(-0.25, 0.25) * rows  # Light from above or below.
  if camera.infrared:
    contrast = camera.gain * rng.uniform(0.85, 1.2)
    image = (image - 0.4) * contrast + 0.4 + rng.normal(0, 0.04)
  else:
    balance = np.asarray(camera.white_balance, np.float32) * rng.normal(1.0, 0.04, 3).astype(np.float32)
    image = image * (camera.gain * rng.uniform(0.75, 1.15)) * balance
  image = _gaussian_blur(image * light, camera.blur * height / 128 * rng.uniform(0.8, 1.25))
  image = image + rng.normal(0, camera.noise, image.shape).astype(np.float32)
  pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
  if camera.infrared:
    pixels = np.repeat(pixels, 3, axis=2)
  return pixels


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Imitation VLM descriptions.

_VIEW_PHRASES = {"front": ("walking towards the camera", "facing the camera"),
                 "back": ("walking away from the camera", "seen from behind"),
                 "side": ("walking past the camera", "seen from the side")}
_BUILD_WORDS = {"slim": ("slim", "thin"), "medium": ("",), "heavy": ("heavy-set", "stocky")}
_HEIGHT_WORDS = {"short": "short", "average": "", "tall": "tall"}


def _article(phrase: str) -> str:
  return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


@dataclasses.dataclass(frozen=True)
class ColourNoise:
  """Infrared descriptions: probability that a colour word is missing / wrong (else correct)."""
  missing: float = 0.5
  wrong: float = 0.25

  def __post_init__(self):
    if min(self.missing, self.wrong) < 0 or self.missing + self.wrong > 1:
      raise ValueError(f"colour noise rates must be >= 0 and sum to <= 1, got {self}")


def _slot_colour(true: str, vocabulary: Sequence[str], heat: float, infrared: bool, noise: ColourNoise,
                 rng: np.random.Generator) -> tuple[str, str]:
  """(colour word or '', outcome) for one colour slot of a description."""
  if not infrared:
    return true, "correct"
  u = rng.random()
  if u < noise.missing:
    # A VLM often gives a tone instead of a colour for thermal images: brightness, not colour.
    tone = ("light" if heat > 0.55 else "dark") if rng.random() < 0.3 else ""
    return tone, "missing"
  if u < noise.missing + noise.wrong:
    others = [c for c in vocabulary if c != true]
    return others[int(rng.integers(len(others)))], "wrong"
  return true, "correct"


def describe(identity: Identity, camid: int, index: int, seed: int,
             noise: ColourNoise = ColourNoise()) -> tuple[str, dict[str, str]]:
  """An imitation-VLM description of one image and the outcome of each colour slot.

  Visible: correct, in one of several sentence styles. Infrared: shapes correct; each colour word
  missing / wrong / correct with the `noise` rates. A colour word always sits right before its
  garment noun ("a red t-shirt"), the form a VLM uses.
  """
  infrared = camid in INFRARED_CAMERAS
  rng = np.random.default_rng([seed, 3, identity.pid, camid, index])
  plan = image_plan(seed, identity.pid, camid, index)
  outcomes = {}

  def coloured(slot: str, true: str, vocabulary: Sequence[str], heat: float, noun: str) -> str:
    word, outcomes[slot] = _slot_colour(true, vocabulary, heat, infrared, noise, rng)
    return f"{word} {noun}" if word else noun

  hair = coloured("hair", identity.hair_colour, tuple(HAIR_COLOURS), HEAT["hair"],
                  "hair")
  hair = f"{HAIR_WORDS[identity.hair_length]} {hair}"
  upper_noun = identity.upper_noun
  if identity.upper_pattern == "striped" and not infrared:
    upper = _article("striped " + coloured("upper", identity.upper_colour, tuple(UPPER_COLOURS), 0.0,
                                           upper_noun))
  else:
    upper = _article(coloured("upper", identity.upper_colour, tuple(UPPER_COLOURS),
                              HEAT[identity.upper_material], upper_noun))
  lower = coloured("lower", identity.lower_colour, tuple(LOWER_COLOURS), HEAT[identity.lower_material],
                   identity.lower_noun)
  if identity.lower_type == "skirt":
    lower = _article(lower)
  shoes = coloured("shoes", identity.shoe_colour, tuple(SHOE_COLOURS),
                   HEAT[SHOE_MATERIALS[identity.shoes]], identity.shoes)
  bag = None
  if identity.bag != "none":
    bag = _article(coloured("bag", identity.bag_colour, tuple(BAG_COLOURS), HEAT[identity.bag_material],
                            identity.bag))
  words = [_HEIGHT_WORDS[identity.height] if rng.random() < 0.6 else "",
           str(rng.choice(_BUILD_WORDS[identity.build])), identity.gender]
  subject = " ".join(w for w in words if w)
  pron = "He" if identity.gender == "man" else "She"
  view = str(rng.choice(_VIEW_PHRASES[plan.view]))
  carry = f", carrying {bag}" if bag else ""
  carry_sentence = f" {pron} carries {bag}." if bag else ""
  if infrared:
    templates = (
        f"An infrared image of {_article(subject)} with {hair}, wearing {upper}, {lower} and {shoes}{carry}.",
        f"In this thermal image, {_article(subject)} {view} wears {upper} and {lower} with {shoes}. "
        f"{pron} has {hair}.{carry_sentence}",
        f"A grayscale infrared photo shows {_article(subject)} with {hair} in {upper} and {lower}, "
        f"{shoes}{carry}.",
        f"Infrared view of {_article(subject)} {view}: {hair}, {upper}, {lower}, {shoes}{carry}.",
    )
  else:
    templates = (
        f"{_article(subject).capitalize()} with {hair}, wearing {upper}, {lower} and {shoes}{carry}.",
        f"The pedestrian is {_article(subject)} {view}. {pron} has {hair} and wears {upper} with "
        f"{lower} and {shoes}.{carry_sentence}",
        f"{_article(subject).capitalize()} {view}, dressed in {upper} and {lower}, with {hair} and "
        f"{shoes}{carry}.",
        f"This {subject} has {hair}. {pron} is wearing {upper}, {lower} and {shoes}{carry}.",
        f"gender: {identity.gender}; hair: {hair}; top: {upper}; bottom: {lower}; shoes: {shoes}; "
        f"bag: {bag or 'none'}.",
    )
  return templates[int(rng.integers(len(templates)))], outcomes


# ---------------------------------------------------------------------------------------------
# Writing the data set.

def _render_job(job: tuple) -> bytes:
  identity, camid, index, height, width, seed = job
  return encode_jpeg(render_image(identity, camid, index, height, width, seed),
                     CAMERA_SETTINGS[camid].quality)


_OUTPUTS = tuple(f"cam{c}" for c in CAMERAS) + ("exp", DESCRIPTIONS, MARKER)


def _check_out(out: str, overwrite: bool) -> None:
  """Refuses a non-empty folder unless overwriting a previous output of this generator."""
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise DatasetError(f"--out {out} exists and is not a folder")
  entries = os.listdir(out)
  if not entries:
    return
  if not overwrite:
    raise DatasetError(f"--out {out} exists and is not empty; pass --overwrite to replace a previous "
                       "synthetic data set there, or choose another folder")
  if MARKER not in entries:
    raise DatasetError(f"--out {out} is not empty and holds no {MARKER}, so it was not written by this "
                       "generator; refusing to overwrite it. Choose another folder.")


def _replace_outputs(staging: str, out: str) -> None:
  """Moves the finished set into `out`, replacing what an earlier run wrote there (only that)."""
  os.makedirs(out, exist_ok=True)
  for name in _OUTPUTS:
    path = os.path.join(out, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  for name in sorted(os.listdir(staging)):
    os.replace(os.path.join(staging, name), os.path.join(out, name))


def generate(out: str, num_ids: int = 120, images_per_camera: int = 5, height: int = 128,
             width: int = 64, seed: int = 0, val_fraction: float = VAL_FRACTION, workers: int = 1,
             overwrite: bool = False,
             ir_colour_missing: float = 0.5, ir_colour_wrong: float = 0.25,
             verbose: bool = False) -> dict:
  """Writes the synthetic data set to `out` and returns a summary.

  The set is assembled in a temporary folder next to `out` and moved in at the end, so a crash
  never leaves a half-written data set behind (nor removes the one an --overwrite would replace). `workers` > 1 renders in that many processes; the
  output does not depend on it.
  Returns: {"out", "ids": {split: count}, "images_per_camera": {camid: count}, "images",
  "descriptions", "seconds", "settings"}.
  """
  start = time.perf_counter()
  if images_per_camera < 1 or height < 16 or width < 8:
    raise ValueError("need images_per_camera >= 1, height >= 16 and width >= 8, got "
                     f"{images_per_camera}, {height}, {width}")
  noise = ColourNoise(ir_colour_missing, ir_colour_wrong)
  out = os.path.abspath(os.fspath(out))
  _check_out(out, overwrite)
  splits = assign_splits(seed, num_ids, val_fraction)
  identities = [sample_identity(seed, pid, splits[pid]) for pid in range(1, num_ids + 1)]
  jobs = [(identity, camid, index, height, width, seed)
          for identity in identities for camid in identity.cameras
          for index in range(1, images_per_camera + 1)]

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
  try:
    if workers > 1:
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        encoded = pool.imap(_render_job, jobs, chunksize=32)
        _write_images(staging, jobs, encoded)
    else:
      _write_images(staging, jobs, map(_render_job, jobs))
    os.makedirs(os.path.join(staging, "exp"))
    for split in ("train", "val", "test"):
      ids = sorted(i.pid for i in identities if i.split == split)
      with open(os.path.join(staging, "exp", f"{split}_id.txt"), "w") as f:
        f.write(",".join(str(i) for i in ids) + "\n")
    records = []
    for identity, camid, index, *_ in jobs:
      text, _ = describe(identity, camid, index, seed, noise)
      infrared = camid in INFRARED_CAMERAS
      records.append({
          "image": f"cam{camid}/{identity.pid:04d}/{index:04d}.jpg",
          "modality": "infrared" if infrared else "visible", "description": text, "rewritten": None,
          "model": CAPTIONER, "prompt": INFRARED_PROMPT if infrared else VISIBLE_PROMPT,
          "rewrite_model": None, "rewrite_prompt": None,
          "generation": {"generator": GENERATOR, "seed": seed,
                         "infrared_colour_missing": noise.missing, "infrared_colour_wrong": noise.wrong},
          "flags": []})
    records.sort(key=lambda r: r["image"])
    descriptions_lib.write_records(os.path.join(staging, DESCRIPTIONS), records)
    settings = {"num_ids": num_ids, "images_per_camera": images_per_camera, "height": height,
                "width": width, "seed": seed, "val_fraction": val_fraction, "ir_colour_missing": noise.missing,
                "ir_colour_wrong": noise.wrong}
    with open(os.path.join(staging, MARKER), "w") as f:
      json.dump({"generator": GENERATOR, "version": VERSION, "settings": settings,
                 "identities": [dataclasses.asdict(i) for i in identities]}, f, indent=1)
      f.write("\n")
    _replace_outputs(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)

  per_camera = {c: sum(1 for j in jobs if j[1] == c) for c in CAMERAS}
  summary = {
      "out": out,
      "ids": {s: sum(1 for i in identities if i.split == s) for s in ("train", "val", "test")},
      "images_per_camera": per_camera, "images": len(jobs), "descriptions": len(records),
      "seconds": round(time.perf_counter() - start, 2), "settings": settings}
  if verbose:
    print(format_summary(summary))
  return summary


def _write_images(root: str, jobs: Sequence[tuple], encoded) -> None:
  for (identity, camid, index, *_), data in zip(jobs, encoded):
    folder = os.path.join(root, f"cam{camid}", f"{identity.pid:04d}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{index:04d}.jpg"), "wb") as f:
      f.write(data)


def format_summary(summary: dict) -> str:
  ids = summary["ids"]
  cams = ", ".join(f"cam{c} {n}" for c, n in summary["images_per_camera"].items())
  return (f"synthetic SYSU-MM01 layout written to {summary['out']}\n"
          f"  identities: {ids['train']} train + {ids['val']} val (training), {ids['test']} test\n"
          f"  images: {summary['images']} ({cams})\n"
          f"  descriptions: {summary['descriptions']} in {DESCRIPTIONS}\n"
          f"  time: {summary['seconds']:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--out", required=True, help="folder to write the data set to")
  parser.add_argument("--num_ids", type=int, default=120)
  parser.add_argument("--images_per_camera", type=int, default=5)
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--val_fraction", type=float, default=VAL_FRACTION,
                      help="share of identities in exp/val_id.txt (held out by --config.dataset.holdout)")
  parser.add_argument("--workers", type=int, default=1, help="rendering processes")
  parser.add_argument("--ir_colour_missing", type=float, default=0.5,
                      help="probability that an infrared description omits a colour")
  parser.add_argument("--ir_colour_wrong", type=float, default=0.25,
                      help="probability that an infrared description names a wrong colour")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace a data set this generator wrote before in --out")
  args = parser.parse_args(argv)
  try:
    generate(args.out, args.num_ids, args.images_per_camera, args.height, args.width, args.seed,
             val_fraction=args.val_fraction, workers=args.workers, overwrite=args.overwrite, ir_colour_missing=args.ir_colour_missing,
             ir_colour_wrong=args.ir_colour_wrong, verbose=True)
  except (DatasetError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
