"""How a synthetic pedestrian image is drawn, and what each image shows.

Every image has a plan (view, distance, occluder, which side a handbag hangs on) drawn from its own
random stream; the renderer draws from it and `visible_parts` reads it, so the captioner describes
exactly what the picture shows: a backpack seen from the front is straps at most, a handbag on the
far side of a side view is hidden by the body, a railing across the legs hides the shoes (and, low
enough, the lower garment), and a distant person's shoes and handbag are too small to name.

Infrared images render heat and material, not colour: skin and hair warm, each fabric its own gray
level whatever its colour, a cool noisy background.
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from data_pipelines.synthetic.canvas import Canvas, gaussian_blur
from data_pipelines.synthetic.identities import (ACCESSORY_HEAT, BAG_HEAT, BUILD_WIDTH, COLOURS,
                                                  HEAT, HEIGHT_SCALE,
                                                  SHOE_MATERIALS, SKIN_TONES, Identity, choice)

VIEWS = {"front": 45, "back": 40, "side": 15}


@dataclasses.dataclass(frozen=True)
class Scene:
  """How busy the pictures are: the nuisances around the person (generator settings)."""
  clutter: float = 0.5        # contrast of the background clutter (0: plain wall and floor)
  far_prob: float = 0.1       # share of images of a distant (small, blurrier) person
  occluder_prob: float = 0.1  # share of images with a railing across the legs or a pole

  def __post_init__(self):
    for name in ("clutter", "far_prob", "occluder_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class ImagePlan:
  """Per-image choices that both the renderer and the captioner need (fractions of the image)."""
  view: str            # "front" | "back" | "side"
  facing: int          # +1 / -1: which way a side view faces; which hand holds a handbag
  distance: str        # "near" | "far"
  figure: float        # figure height before the identity's height scale
  centre: float        # horizontal centre of the figure
  foot: float          # vertical position of the feet
  occluder: str        # "none" | "legs" (railing / bench from `occluder_at` down) | "pole"
  occluder_at: float   # top of a legs occluder, or left edge of a pole
  occluder_size: float  # width of a pole
  handbag_near: bool   # side views: the handbag hangs on the camera side (else hidden behind)
  blur: float          # multiplier of the camera's blur


def image_plan(seed: int, pid: int, camid: int, index: int, scene: Scene = Scene()) -> ImagePlan:
  rng = np.random.default_rng([seed, 4, pid, camid, index])
  view = choice(rng, VIEWS)
  facing = 1 if rng.random() < 0.5 else -1
  far = rng.random() < scene.far_prob
  occluder = "none"
  if rng.random() < scene.occluder_prob:
    occluder = "legs" if rng.random() < 0.5 else "pole"
  return ImagePlan(
      view=view, facing=facing, distance="far" if far else "near",
      figure=(0.58 if far else 0.8) * float(rng.uniform(0.96, 1.04)),
      centre=0.5 + float(rng.normal(0, 0.06)),
      foot=float(rng.uniform(0.8, 0.92) if far else rng.uniform(0.93, 1.0)),
      occluder=occluder,
      occluder_at=float(rng.uniform(0.62, 0.82) if occluder == "legs" else rng.uniform(0.15, 0.75)),
      occluder_size=float(rng.uniform(0.1, 0.22)),
      handbag_near=bool(rng.random() < 0.5),
      blur=float(rng.uniform(0.8, 1.25) * (1.5 if far else 1.0)))


def _body_y(identity: Identity, plan: ImagePlan, fraction: float) -> float:
  """Image row (fraction of the height) of a point `fraction` down the figure."""
  fh = plan.figure * HEIGHT_SCALE[identity.height]
  return plan.foot - fh + fraction * fh


def visible_parts(identity: Identity, plan: ImagePlan) -> dict[str, str]:
  """Caption slot -> "full" or "partial" for what this image shows; hidden slots are absent.

  Slots: gender, build, height, hair, headwear, scarf, upper, outer, lower, shoes, bag.
  """
  parts = {"gender": "full", "build": "full", "height": "full", "hair": "full", "upper": "full"}
  if identity.headwear != "none":
    parts["headwear"] = "full"
  if identity.scarf != "none":
    parts["scarf"] = "full"
  if identity.outer != "none":
    parts["outer"] = "full"
  legs_from = plan.occluder_at if plan.occluder == "legs" else 2.0
  if legs_from > _body_y(identity, plan, 0.62):   # the railing leaves the thighs visible
    parts["lower"] = "full"
  if legs_from > _body_y(identity, plan, 0.95) and plan.distance == "near":
    parts["shoes"] = "full"
  if identity.bag == "backpack":
    parts["bag"] = "partial" if plan.view == "front" else "full"  # front: straps only
  elif identity.bag == "handbag":
    hidden = (plan.view == "side" and not plan.handbag_near) or plan.distance == "far"
    if not hidden:
      parts["bag"] = "full"
  return parts


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


def _background(rng: np.random.Generator, camera: Camera, h: int, w: int, clutter: float) -> np.ndarray:
  """Camera scene: wall/floor (or sky/ground) split, clutter boxes of contrast `clutter`, texture."""
  channels = 1 if camera.infrared else 3
  upper = np.asarray(camera.upper_bg, np.float32) * rng.uniform(0.85, 1.15)
  lower = np.asarray(camera.lower_bg, np.float32) * rng.uniform(0.85, 1.15)
  horizon = h * rng.uniform(0.45, 0.7)
  rows = np.arange(h, dtype=np.float32)[:, None, None]
  mix = np.clip((rows - horizon) / 3.0 + 0.5, 0.0, 1.0)
  image = np.broadcast_to(upper * (1 - mix) + lower * mix, (h, w, channels)).astype(np.float32)
  canvas = Canvas(image)
  for _ in range(int(rng.integers(2, 5))):
    x0, y0 = rng.uniform(-0.2 * w, w), rng.uniform(-0.1 * h, h * 0.8)
    bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.05, 0.4) * h
    if camera.infrared:
      level = rng.uniform(0.55, 0.7) if rng.random() < 0.1 else rng.uniform(0.08, 0.42)
      value = np.asarray([level], np.float32)
    else:
      value = np.clip(upper * rng.uniform(0.5, 1.3, 3) + rng.normal(0, 0.06, 3), 0, 1).astype(np.float32)
    wall = upper if y0 + bh / 2 < horizon else lower
    value = (wall * (1.0 - clutter) + value * clutter).astype(np.float32)
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
        "bag": BAG_HEAT.get(identity.bag_material, 0.0),
        "headwear": ACCESSORY_HEAT.get(identity.headwear, 0.0), "scarf": ACCESSORY_HEAT["scarf"],
        "outer": HEAT.get(identity.outer_material, 0.0) + warm}
    return {k: np.asarray([v], np.float32) for k, v in levels.items()}
  shade = np.asarray(identity.shade, np.float32)

  def dyed(name: str) -> np.ndarray:
    return np.clip(np.asarray(COLOURS[name], np.float32) * shade, 0.0, 1.0)

  return {"skin": np.asarray(SKIN_TONES[identity.skin], np.float32),
          "hair": np.asarray(COLOURS[identity.hair_colour], np.float32),
          "upper": dyed(identity.upper_colour), "stripe": dyed(identity.stripe_colour),
          "lower": dyed(identity.lower_colour), "shoes": dyed(identity.shoe_colour),
          "bag": dyed(identity.bag_colour) if identity.bag != "none" else np.zeros(3, np.float32),
          "headwear": dyed(identity.headwear_colour) if identity.headwear != "none" else np.zeros(3, np.float32),
          "scarf": dyed(identity.scarf_colour) if identity.scarf != "none" else np.zeros(3, np.float32),
          "outer": dyed(identity.outer_colour) if identity.outer != "none" else np.zeros(3, np.float32)}


def _draw_person(canvas: Canvas, identity: Identity, plan: ImagePlan, values: dict[str, np.ndarray],
                 rng: np.random.Generator, infrared: bool) -> None:
  """Draws one pedestrian: limbs as tapered capsules, torso and skirt as polygons."""
  h, w = canvas.h, canvas.w
  fh = h * plan.figure * HEIGHT_SCALE[identity.height]  # Figure height (px).
  cx = w * plan.centre
  foot = h * plan.foot
  top = foot - fh

  def y(fraction: float) -> float:
    return top + fraction * fh

  man = identity.gender == "man"
  build = BUILD_WIDTH[identity.build]
  squeeze = 0.62 if plan.view == "side" else 1.0
  shoulder = fh * (0.125 if man else 0.095) * build * squeeze
  hip = fh * (0.080 if man else 0.105) * build * squeeze
  lean = rng.normal(0, 0.01 * fh)
  limb = fh * 0.030 * math.sqrt(build)
  leg = fh * 0.036 * build ** 0.6
  head = (cx + lean, y(0.075))
  head_rx, head_ry = fh * 0.048, fh * 0.064
  front = plan.view == "front"
  back = plan.view == "back"

  # Hair behind the head and shoulders (front/side views show it beside the neck).
  if identity.hair_length != "short" and not back:
    bottom = y(0.17 if identity.hair_length == "medium" else 0.32)
    offset = -plan.facing * head_rx * 0.4 if plan.view == "side" else 0.0
    hair_x = head[0] + offset
    canvas.polygon([(hair_x - head_rx * 1.25, head[1]), (hair_x + head_rx * 1.25, head[1]),
                    (hair_x + head_rx * 1.45, bottom), (hair_x - head_rx * 1.45, bottom)], values["hair"])
  far_handbag = plan.view == "side" and not plan.handbag_near
  if identity.bag == "handbag" and far_handbag:  # held on the far side: behind the hips and legs
    canvas.polygon([(cx - fh * 0.04, y(0.5)), (cx + fh * 0.04, y(0.5)), (cx + fh * 0.045, y(0.6)),
                    (cx - fh * 0.045, y(0.6))], values["bag"])
  # Backpack seen from the side sticks out behind the torso.
  if identity.bag == "backpack" and plan.view == "side":
    bx = cx - plan.facing * shoulder * 1.7
    canvas.polygon([(bx - fh * 0.06, y(0.18)), (bx + fh * 0.06, y(0.18)), (bx + fh * 0.065, y(0.47)),
                    (bx - fh * 0.065, y(0.47))], values["bag"])
  # Backpack seen from the front: its body peeks out on both sides of the torso.
  if identity.bag == "backpack" and front:
    canvas.polygon([(cx - shoulder * 1.15, y(0.2)), (cx + shoulder * 1.15, y(0.2)),
                    (cx + shoulder * 1.2, y(0.48)), (cx - shoulder * 1.2, y(0.48))], values["bag"])

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

  def handbag(hand: tuple[float, float]) -> None:
    hx, hy = hand
    canvas.capsule((hx, hy), (hx, hy + fh * 0.04), limb * 0.35, limb * 0.35, values["bag"])
    canvas.polygon([(hx - fh * 0.06, hy + fh * 0.04), (hx + fh * 0.06, hy + fh * 0.04),
                    (hx + fh * 0.07, hy + fh * 0.17), (hx - fh * 0.07, hy + fh * 0.17)], values["bag"])

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
  if identity.outer == "vest":  # open at the front (panels at the sides); the back is covered
    if back or plan.view == "side":
      canvas.polygon([(cx + lean - shoulder * 0.95, y(0.18)), (cx + lean + shoulder * 0.95, y(0.18)),
                      (cx + hip * 1.02, y(0.52)), (cx - hip * 1.02, y(0.52))], values["outer"])
    else:
      for side in (-1, 1):
        outer_x, inner_x = cx + lean + side * shoulder * 0.98, cx + lean + side * shoulder * 0.35
        canvas.polygon([(outer_x, y(0.18)), (inner_x, y(0.18)), (cx + side * hip * 0.3, y(0.52)),
                        (cx + side * hip * 1.04, y(0.52))], values["outer"])
  if identity.scarf == "scarf":  # around the neck, its end hanging on the chest (or the back)
    canvas.capsule((cx + lean - shoulder * 0.45, y(0.165)), (cx + lean + shoulder * 0.45, y(0.165)),
                   fh * 0.03, fh * 0.03, values["scarf"])
    tail_x = cx + lean + (0.2 * shoulder if plan.view != "side" else -plan.facing * 0.1 * shoulder)
    canvas.capsule((tail_x, y(0.17)), (tail_x, y(0.34)), fh * 0.022, fh * 0.02, values["scarf"])
  if identity.bag == "backpack":
    if back:
      canvas.polygon([(cx + lean - shoulder * 0.9, y(0.18)), (cx + lean + shoulder * 0.9, y(0.18)),
                      (cx + shoulder * 1.05, y(0.5)), (cx - shoulder * 1.05, y(0.5))], values["bag"])
    elif front:
      for side in (-1, 1):
        canvas.capsule((cx + lean + side * shoulder * 0.55, y(0.175)), (cx + side * shoulder * 0.65, y(0.42)),
                       limb * 0.55, limb * 0.55, values["bag"])
  if plan.view == "side":
    arm(plan.facing)
  else:
    arm(-1)
    arm(1)
  if identity.bag == "handbag" and not far_handbag:
    # Side view: the near hand (drawn last); front / back: the hand on the `facing` side.
    handbag(hands[-1] if plan.view == "side" or plan.facing > 0 else hands[0])

  # Head and hair.
  if back:
    canvas.ellipse(head[0], head[1], head_rx, head_ry, values["hair"])
    if identity.hair_length != "short":
      bottom = y(0.17 if identity.hair_length == "medium" else 0.32)
      canvas.polygon([(head[0] - head_rx * 1.15, head[1]), (head[0] + head_rx * 1.15, head[1]),
                      (head[0] + head_rx * 1.4, bottom), (head[0] - head_rx * 1.4, bottom)], values["hair"])
  else:
    canvas.ellipse(head[0], head[1], head_rx, head_ry, values["skin"])
    cap_x = head[0] - (plan.facing * head_rx * 0.3 if plan.view == "side" else 0.0)
    canvas.ellipse(cap_x, head[1] - head_ry * 0.45, head_rx * 1.08, head_ry * 0.62, values["hair"])
  if identity.headwear == "beanie":  # covers the top of the head down to the ears
    canvas.ellipse(head[0], head[1] - head_ry * 0.35, head_rx * 1.15, head_ry * 0.75, values["headwear"])
  elif identity.headwear == "cap":  # a dome and a brim (to the front, or sideways in a side view)
    canvas.ellipse(head[0], head[1] - head_ry * 0.5, head_rx * 1.08, head_ry * 0.55, values["headwear"])
    if plan.view == "side":
      bx = head[0] + plan.facing * head_rx * 1.1
      canvas.polygon([(bx - head_rx * 0.6, head[1] - head_ry * 0.3), (bx + head_rx * 0.7, head[1] - head_ry * 0.25),
                      (bx + head_rx * 0.7, head[1] - head_ry * 0.1), (bx - head_rx * 0.6, head[1] - head_ry * 0.1)],
                     values["headwear"])
    elif front:
      canvas.ellipse(head[0], head[1] - head_ry * 0.12, head_rx * 1.2, head_ry * 0.18, values["headwear"])


def render_image(identity: Identity, camid: int, index: int, height: int, width: int,
                 seed: int, scene: Scene = Scene()) -> np.ndarray:
  """Renders image `index` of `identity` in camera `camid` as its plan says.

  Returns: (height, width, 3) uint8; for infrared cameras the three channels are equal.
  """
  camera = CAMERA_SETTINGS[camid]
  rng = np.random.default_rng([seed, 2, identity.pid, camid, index])
  plan = image_plan(seed, identity.pid, camid, index, scene)
  image = _background(rng, camera, height, width, scene.clutter)
  canvas = Canvas(image)
  _draw_person(canvas, identity, plan, _values(identity, camera, rng), rng, camera.infrared)
  if plan.occluder != "none":  # A railing / bench across the legs, or a pole.
    if camera.infrared:
      value = np.asarray([rng.uniform(0.12, 0.4)], np.float32)
    else:
      value = np.clip(np.asarray(camera.lower_bg, np.float32) * rng.uniform(0.5, 1.4, 3), 0, 1)
    if plan.occluder == "legs":
      y0 = height * plan.occluder_at
      canvas.polygon([(0, y0), (width, y0), (width, height), (0, height)], value)
    else:
      x0, bar = width * plan.occluder_at, width * plan.occluder_size
      canvas.polygon([(x0, 0), (x0 + bar, 0), (x0 + bar, height), (x0, height)], value)
  rows = np.arange(height, dtype=np.float32)[:, None, None] / height - 0.5
  light = 1.0 + rng.uniform(-0.25, 0.25) * rows  # Light from above or below.
  if camera.infrared:
    contrast = camera.gain * rng.uniform(0.85, 1.2)
    image = (image - 0.4) * contrast + 0.4 + rng.normal(0, 0.04)
  else:
    balance = np.asarray(camera.white_balance, np.float32) * rng.normal(1.0, 0.04, 3).astype(np.float32)
    image = image * (camera.gain * rng.uniform(0.75, 1.15)) * balance
  image = gaussian_blur(image * light, camera.blur * height / 128 * plan.blur)
  image = image + rng.normal(0, camera.noise, image.shape).astype(np.float32)
  pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
  if camera.infrared:
    pixels = np.repeat(pixels, 3, axis=2)
  return pixels


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()
