"""Who the synthetic people are: attribute vocabularies, one person's draw, and the id splits.

Identities share a body plan and differ by attributes from small, skewed vocabularies, so two
people often match on several cues. Shape cues (build, height, hair length, sleeve, lower garment,
shoes, bag) and materials are seen by both modalities; colour only by visible cameras.
"""
from __future__ import annotations

import dataclasses

import numpy as np

VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
CAMERAS = (1, 2, 3, 4, 5, 6)
VAL_FRACTION = 0.05  # share of ids in exp/val_id.txt unless asked otherwise
TEST_FRACTION = 1 / 3  # share of ids in exp/test_id.txt unless asked otherwise

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
STRIPE_COLOURS = ("white", "black", "red", "blue", "yellow")
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
HEADWEAR = {"none": 60, "cap": 22, "beanie": 18}
# Worn away from the skin, a cap, a beanie and a scarf show cooler than clothes in infrared.
ACCESSORY_HEAT = {"cap": 0.36, "beanie": 0.28, "scarf": 0.3}
HEADWEAR_COLOURS = {"black": 30, "white": 15, "gray": 15, "red": 12, "blue": 14, "green": 7, "yellow": 7}
SCARF_COLOURS = {"black": 20, "gray": 20, "red": 20, "white": 15, "blue": 15, "yellow": 10}
OUTER_MATERIALS = {"down": 60, "fleece": 40}  # the sleeveless outer layer: a vest over the top
OUTER_COLOURS = {"black": 30, "blue": 20, "red": 15, "green": 15, "gray": 10, "orange": 10}
BAG_MATERIALS = {"backpack": {"nylon": 80, "leather": 20}, "handbag": {"leather": 70, "nylon": 30}}
# Infrared gray level of each material worn on the body (a heat/reflectance proxy), independent of
# colour; a carried bag is near the ambient temperature, darker than anything worn.
HEAT = {"skin": 0.86, "hair": 0.72, "cotton": 0.58, "synthetic": 0.66, "wool": 0.46, "leather": 0.34,
        "denim": 0.50, "canvas": 0.42, "down": 0.26, "fleece": 0.36}
BAG_HEAT = {"nylon": 0.24, "leather": 0.17}
BUILD_WIDTH = {"slim": 0.8, "medium": 1.0, "heavy": 1.3}
HEIGHT_SCALE = {"short": 0.91, "average": 1.0, "tall": 1.08}

# The attributes an infrared image shows (no colour, but each fabric's heat): the attribute oracle's.
INFRARED_ATTRIBUTES = ("gender", "build", "height", "hair_length", "headwear", "scarf", "sleeve",
                       "upper_material", "outer", "outer_material", "lower_type", "lower_material",
                       "shoes", "bag", "bag_material")
# The attributes both modalities show (materials are invisible in colour images, colour in infrared):
# all an infrared query and a visible gallery image can have in common.
SHARED_ATTRIBUTES = ("gender", "build", "height", "hair_length", "headwear", "scarf", "sleeve", "outer",
                     "lower_type", "shoes", "bag")


@dataclasses.dataclass(frozen=True)
class Identity:
  """Ground-truth attributes of one synthetic person (written to synthetic.json)."""
  pid: int
  split: str  # "train", "val", "test" (benchmark) or "pretrain"
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
  headwear: str  # "none" | "cap" | "beanie"
  headwear_colour: str
  scarf: str  # "none" | "scarf"
  scarf_colour: str
  outer: str  # "none" | "vest" (a sleeveless layer over the upper garment)
  outer_material: str
  outer_colour: str
  shade: tuple[float, float, float]  # Per-person dye shade of the clothes (visible).
  warmth: float  # Per-person infrared offset (clothing thickness, fit).

  @property
  def upper_noun(self) -> str:
    return UPPER_NOUNS[(self.sleeve, self.upper_material)]

  @property
  def lower_noun(self) -> str:
    return LOWER_NOUNS[(self.lower_type, self.lower_material)]

  def signature(self, attributes: tuple[str, ...] = INFRARED_ATTRIBUTES) -> tuple[str, ...]:
    """The values of `attributes` (default: what an infrared image can show)."""
    return tuple(getattr(self, a) for a in attributes)


def choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
  """One key of `weights`, drawn with probability proportional to its weight."""
  names = list(weights)
  p = np.asarray([weights[n] for n in names], dtype=np.float64)
  return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_identity(seed: int, pid: int, split: str) -> Identity:
  """Draws one person's attributes from its own random stream (independent of the others)."""
  rng = np.random.default_rng([seed, 1, pid])
  gender = choice(rng, {"man": 50, "woman": 50})
  man = gender == "man"
  hair_length = choice(rng, {"short": 75, "medium": 20, "long": 5} if man else
                       {"short": 15, "medium": 35, "long": 50})
  sleeve = choice(rng, {"short": 50, "long": 50})
  lower_type = choice(rng, {"trousers": 75, "shorts": 25} if man else
                      {"trousers": 50, "shorts": 15, "skirt": 35})
  bag = choice(rng, {"none": 50, "backpack": 38, "handbag": 12} if man else
               {"none": 35, "backpack": 25, "handbag": 40})
  upper_colour = choice(rng, UPPER_COLOURS)
  stripe_colour = choice(rng, {c: 1 for c in STRIPE_COLOURS if c != upper_colour})
  shoes = choice(rng, {"sneakers": 65, "boots": 35})
  headwear = choice(rng, HEADWEAR)
  scarf = choice(rng, {"none": 78, "scarf": 22})
  outer = choice(rng, {"none": 65, "vest": 35})
  extras = dict(
      headwear=headwear, headwear_colour=choice(rng, HEADWEAR_COLOURS) if headwear != "none" else "none",
      scarf=scarf, scarf_colour=choice(rng, SCARF_COLOURS) if scarf != "none" else "none",
      outer=outer, outer_material=choice(rng, OUTER_MATERIALS) if outer != "none" else "none",
      outer_colour=choice(rng, OUTER_COLOURS) if outer != "none" else "none")
  cameras = [c for c in VISIBLE_CAMERAS if rng.random() < 0.75]
  cameras += [c for c in INFRARED_CAMERAS if rng.random() < 0.8]
  if not any(c in VISIBLE_CAMERAS for c in cameras):
    cameras.append(VISIBLE_CAMERAS[int(rng.integers(4))])
  if not any(c in INFRARED_CAMERAS for c in cameras):
    cameras.append(INFRARED_CAMERAS[int(rng.integers(2))])
  return Identity(
      pid=pid, split=split, cameras=tuple(sorted(cameras)), gender=gender,
      build=choice(rng, {"slim": 30, "medium": 50, "heavy": 20}),
      height=choice(rng, {"short": 25, "average": 50, "tall": 25}),
      skin=int(rng.integers(len(SKIN_TONES))), hair_length=hair_length,
      hair_colour=choice(rng, HAIR_COLOURS), sleeve=sleeve,
      upper_material=choice(rng, UPPER_MATERIALS[sleeve]), upper_colour=upper_colour,
      upper_pattern=choice(rng, {"plain": 80, "striped": 20}), stripe_colour=stripe_colour,
      lower_type=lower_type, lower_material=choice(rng, LOWER_MATERIALS[lower_type]),
      lower_colour=choice(rng, LOWER_COLOURS), shoes=shoes, shoe_colour=choice(rng, SHOE_COLOURS),
      bag=bag, bag_material=choice(rng, BAG_MATERIALS[bag]) if bag != "none" else "none",
      bag_colour=choice(rng, BAG_COLOURS) if bag != "none" else "none", **extras,
      shade=tuple(float(s) for s in rng.uniform(0.9, 1.1, 3)), warmth=float(rng.normal(0.0, 0.03)))


def assign_splits(seed: int, num_ids: int, val_fraction: float = VAL_FRACTION,
                  num_test: int | None = None) -> dict[int, str]:
  """Ids 1..num_ids -> split: `num_test` test ids (default a third), `val_fraction` val, the rest train.

  The test ids do not depend on `val_fraction` (they come first in the permutation), and the
  standard protocol trains on train + val, so `val_fraction` only decides how many training
  identities a held-out validation run (config.dataset.holdout) keeps aside.
  """
  if num_ids < 3:
    raise ValueError(f"num_ids must be at least 3 (train, val and test each need one), got {num_ids}")
  if num_test is None:
    num_test = max(1, round(num_ids * TEST_FRACTION))
  num_val = max(1, round(num_ids * val_fraction))
  if num_test < 1:
    raise ValueError(f"num_test must be at least 1, got {num_test}")
  if not 0.0 < val_fraction < 1.0 or num_test + num_val >= num_ids:
    raise ValueError(f"val_fraction={val_fraction} leaves no training identity out of {num_ids} "
                     f"({num_test} test, {num_val} val)")
  order = np.random.default_rng([seed, 0]).permutation(np.arange(1, num_ids + 1))
  splits = {}
  for i, pid in enumerate(order.tolist()):
    splits[pid] = "test" if i < num_test else "val" if i < num_test + num_val else "train"
  return splits
