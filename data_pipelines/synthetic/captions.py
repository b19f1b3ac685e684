"""Imitation vision-language-model captions: one sentence per image, with a real VLM's gaps and noise.

What a one-sentence LLaVA caption of a pedestrian crop does, and this captioner imitates:
- it describes only what this view shows (`render.visible_parts`): no shoes behind a railing, no
  handbag on the far side of the body, backpack straps (not a backpack's colour) from the front;
- it names a handful of attributes, not all of them (`CaptionNoise.min_slots`..`max_slots`, the
  subject "a man" / "a woman" counting as one), so views of one person say different things and
  only their union is complete: the missing cross-view semantics that CVSC compensates;
- a stated attribute of a visible image is occasionally wrong (`visible_wrong`); in an infrared
  image every colour word is often missing or wrong (`ir_colour_missing`, `ir_colour_wrong`): the
  conflicting semantics that CMSP purifies.

Every caption comes with its truth record: which slots the image shows, which the caption states,
and for each stated slot what it says and whether that is right.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_pipelines.synthetic.identities import (ACCESSORY_HEAT, BAG_COLOURS, HAIR_COLOURS,
                                                  HEADWEAR_COLOURS, HEAT, LOWER_COLOURS, LOWER_NOUNS,
                                                  OUTER_COLOURS, SCARF_COLOURS, SHOE_COLOURS,
                                                  SHOE_MATERIALS, UPPER_COLOURS, UPPER_NOUNS, Identity)
from data_pipelines.synthetic.render import ImagePlan, Scene, image_plan, visible_parts

SLOTS = ("gender", "build", "height", "hair", "headwear", "scarf", "upper", "outer", "lower", "shoes",
         "bag")
COLOUR_SLOTS = ("hair", "headwear", "scarf", "upper", "outer", "lower", "shoes", "bag")
# How readily a captioner names a visible slot (relative weights; the subject is always named).
MENTION_WEIGHTS = {"upper": 10, "lower": 8, "outer": 7, "hair": 6, "bag": 6, "headwear": 6,
                   "scarf": 4, "shoes": 4, "build": 3, "height": 2}
CAPTIONER = "synthetic-captioner-v2"
VISIBLE_PROMPT = ("Describe the pedestrian in one sentence: gender, build, hair, upper clothing, lower "
                  "clothing, shoes and belongings, with colours.")
INFRARED_PROMPT = ("This is an infrared image. Describe the pedestrian in one sentence: gender, build, "
                   "hair, upper clothing, lower clothing, shoes and belongings.")

HAIR_WORDS = {"short": "short", "medium": "shoulder-length", "long": "long"}
_BUILD_WORDS = {"slim": ("slim", "thin"), "heavy": ("heavy-set", "stocky")}
_VIEW_PHRASES = {"front": ("walking towards the camera", "facing the camera"),
                 "back": ("walking away from the camera", "seen from behind"),
                 "side": ("walking past the camera", "seen from the side")}
_PALETTES = {"hair": tuple(HAIR_COLOURS), "upper": tuple(UPPER_COLOURS), "lower": tuple(LOWER_COLOURS),
             "shoes": tuple(SHOE_COLOURS), "bag": tuple(BAG_COLOURS),
             "headwear": tuple(HEADWEAR_COLOURS), "scarf": tuple(SCARF_COLOURS),
             "outer": tuple(OUTER_COLOURS)}
# Another kind of the same thing, for a wrong statement (slots absent here are only ever mis-coloured).
_OTHER_NOUNS = {"upper": sorted(set(UPPER_NOUNS.values())), "lower": sorted(set(LOWER_NOUNS.values())),
                "shoes": ("sneakers", "boots"), "bag": ("backpack", "handbag"),
                "headwear": ("cap", "beanie")}
_OTHER = {"gender": {"man": "woman", "woman": "man"}, "build": {"slim": "heavy", "heavy": "slim"},
          "height": {"short": "tall", "tall": "short"}}


@dataclasses.dataclass(frozen=True)
class CaptionNoise:
  """How many attributes a caption names, and how often they are wrong."""
  min_slots: int = 3
  max_slots: int = 6
  visible_wrong: float = 0.05     # a stated attribute is wrong (visible images; shape slots of infrared)
  ir_colour_missing: float = 0.5  # infrared: a colour word is left out (or a tone given instead)
  ir_colour_wrong: float = 0.25   # infrared: a colour word is wrong
  visible_colour_missing: float = 0.0  # visible: a colour word is left out (plain alt-text style)

  def __post_init__(self):
    if min(self.ir_colour_missing, self.ir_colour_wrong) < 0 or \
        self.ir_colour_missing + self.ir_colour_wrong > 1:
      raise ValueError(f"infrared colour noise rates must be >= 0 and sum to <= 1, got {self}")
    if not 0 <= self.visible_colour_missing <= 1:
      raise ValueError(f"visible_colour_missing must lie in [0, 1], got {self.visible_colour_missing}")
    if not 0 <= self.visible_wrong <= 1:
      raise ValueError(f"visible_wrong must lie in [0, 1], got {self.visible_wrong}")
    if not 1 <= self.min_slots <= self.max_slots:
      raise ValueError(f"need 1 <= min_slots <= max_slots, got {self.min_slots}, {self.max_slots}")


def _article(phrase: str) -> str:
  return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _pick_other(rng: np.random.Generator, options: Sequence[str], true: str) -> str:
  others = [o for o in options if o != true]
  return others[int(rng.integers(len(others)))]


def _true_values(identity: Identity) -> dict[str, dict[str, str]]:
  """What a perfect caption would say of each slot."""
  return {
      "gender": {"value": identity.gender}, "build": {"value": identity.build},
      "height": {"value": identity.height},
      "hair": {"length": identity.hair_length, "colour": identity.hair_colour},
      "upper": {"noun": identity.upper_noun, "colour": identity.upper_colour,
                "pattern": identity.upper_pattern},
      "lower": {"noun": identity.lower_noun, "colour": identity.lower_colour},
      "shoes": {"noun": identity.shoes, "colour": identity.shoe_colour},
      "bag": {"noun": identity.bag, "colour": identity.bag_colour},
      "headwear": {"noun": identity.headwear, "colour": identity.headwear_colour},
      "scarf": {"noun": "scarf", "colour": identity.scarf_colour},
      "outer": {"noun": "vest", "colour": identity.outer_colour},
  }


def _heat(identity: Identity, slot: str) -> float:
  return {"hair": HEAT["hair"], "upper": HEAT[identity.upper_material],
          "lower": HEAT[identity.lower_material], "shoes": HEAT[SHOE_MATERIALS[identity.shoes]],
          "bag": 0.2, "headwear": ACCESSORY_HEAT.get(identity.headwear, 0.3),
          "scarf": ACCESSORY_HEAT["scarf"], "outer": HEAT.get(identity.outer_material, 0.3)}[slot]


def _choose_slots(rng: np.random.Generator, identity: Identity, parts: dict[str, str],
                  noise: CaptionNoise) -> list[str]:
  """The subject plus a random handful of the slots this image shows, in SLOTS order."""
  stateable = [s for s in MENTION_WEIGHTS if s in parts
               and not (s == "build" and identity.build == "medium")
               and not (s == "height" and identity.height == "average")]
  k = int(rng.integers(noise.min_slots, noise.max_slots + 1)) - 1
  k = min(k, len(stateable))
  chosen = set()
  if k > 0:
    w = np.asarray([MENTION_WEIGHTS[s] for s in stateable], np.float64)
    chosen = set(np.asarray(stateable)[rng.choice(len(stateable), size=k, replace=False,
                                                  p=w / w.sum())].tolist())
  return [s for s in SLOTS if s == "gender" or s in chosen]


def _state(rng: np.random.Generator, identity: Identity, slot: str, true: dict[str, str],
           partial: bool, infrared: bool, noise: CaptionNoise) -> dict:
  """What the caption says of one slot: {"said": {...}, "correct": bool, "colour": outcome or None}."""
  said = dict(true)
  colour_outcome = None
  wrong = rng.random() < noise.visible_wrong
  if slot in _OTHER:
    if wrong:
      said["value"] = _OTHER[slot][true["value"]]
  else:
    if partial:  # backpack straps from the front: no colour to name
      said["colour"] = ""
      colour_outcome = "missing"
    elif infrared:
      u = rng.random()
      if u < noise.ir_colour_missing:
        # A VLM often gives a tone for a thermal image: brightness, not colour.
        tone = rng.random() < 0.3
        said["colour"] = ("light" if _heat(identity, slot) > 0.55 else "dark") if tone else ""
        colour_outcome = "missing"
      elif u < noise.ir_colour_missing + noise.ir_colour_wrong:
        said["colour"] = _pick_other(rng, _PALETTES[slot], true["colour"])
        colour_outcome = "wrong"
      else:
        colour_outcome = "correct"
    elif rng.random() < noise.visible_colour_missing:
      said["colour"] = ""
      colour_outcome = "missing"
    else:
      colour_outcome = "correct"
    if wrong:  # a visible-style mistake: another colour, or another kind of garment / bag
      recolour = said["colour"] not in ("", "light", "dark") and not partial
      if slot == "hair":
        if recolour and rng.random() < 0.5:
          said["colour"] = _pick_other(rng, _PALETTES[slot], true["colour"])
          colour_outcome = "wrong"
        else:
          said["length"] = _pick_other(rng, tuple(HAIR_WORDS), true["length"])
      elif recolour and (slot not in _OTHER_NOUNS or rng.random() < 0.6):
        said["colour"] = _pick_other(rng, _PALETTES[slot], true["colour"])
        colour_outcome = "wrong"
      elif slot in _OTHER_NOUNS:
        said["noun"] = _pick_other(rng, _OTHER_NOUNS[slot], true["noun"])
    if infrared and slot == "upper":
      said["pattern"] = "plain"  # stripes are colour only
  correct = all(said[k] == true[k] for k in said
                if not (k == "colour" and colour_outcome == "missing")
                and not (k == "pattern" and infrared))
  out = {"said": said, "correct": bool(correct)}
  if colour_outcome is not None:
    out["colour"] = colour_outcome
  if partial:
    out["partial"] = True
  return out


def _phrase(slot: str, said: dict[str, str], partial: bool) -> str:
  colour = said.get("colour", "")
  lead = f"{colour} " if colour else ""
  if slot == "hair":
    return f"{HAIR_WORDS[said['length']]} {lead}hair"
  if slot == "upper":
    striped = "striped " if said.get("pattern") == "striped" else ""
    return _article(f"{striped}{lead}{said['noun']}")
  if slot == "lower":
    phrase = f"{lead}{said['noun']}"
    return _article(phrase) if said["noun"].endswith("skirt") else phrase
  if slot == "shoes":
    return f"{lead}{said['noun']}"
  if slot in ("headwear", "scarf", "outer"):
    return _article(f"{lead}{said['noun']}")
  if partial:
    return f"{said['noun']} straps over the shoulders"
  return _article(f"{lead}{said['noun']}")


def _join(items: Sequence[str]) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(identity: Identity, camid: int, index: int, seed: int, noise: CaptionNoise,
             infrared: bool, scene: Scene = Scene()) -> tuple[str, dict]:
  """The caption of image `index` of `identity` in camera `camid`, and its truth record.

  The truth record: {"visible": {slot: "full" | "partial"}, "stated": {slot: {"said": {...},
  "correct": bool, "colour": "correct" | "wrong" | "missing" (colour slots), "partial": True
  (straps only)}}}.
  """
  rng = np.random.default_rng([seed, 3, identity.pid, camid, index])
  plan: ImagePlan = image_plan(seed, identity.pid, camid, index, scene)
  parts = visible_parts(identity, plan)
  truth = _true_values(identity)
  stated = {slot: _state(rng, identity, slot, truth[slot], parts[slot] == "partial", infrared, noise)
            for slot in _choose_slots(rng, identity, parts, noise)}

  words = []
  if "height" in stated:
    words.append(stated["height"]["said"]["value"])
  if "build" in stated:
    words.append(str(rng.choice(_BUILD_WORDS[stated["build"]["said"]["value"]])))
  gender = stated["gender"]["said"]["value"]
  subject = _article(" ".join(words + [gender]))
  pron = "He" if gender == "man" else "She"
  phrases = {s: _phrase(s, v["said"], v.get("partial", False)) for s, v in stated.items()
             if s in COLOUR_SLOTS}
  if "outer" in phrases and "upper" in phrases:
    phrases["upper"] = f"{phrases.pop('outer')} over {phrases['upper']}"
  clothes = [phrases[s] for s in ("headwear", "scarf", "outer", "upper", "lower", "shoes") if s in phrases]
  hair = phrases.get("hair")
  bag = phrases.get("bag")
  view = str(rng.choice(_VIEW_PHRASES[plan.view]))
  with_hair = f" with {hair}" if hair else ""
  wearing = f", wearing {_join(clothes)}" if clothes else ""
  carrying = (f", with {bag}" if stated.get("bag", {}).get("partial") else f", carrying {bag}") if bag else ""
  sentence_rest = ""
  if hair:
    sentence_rest += f" {pron} has {hair}."
  if bag:
    sentence_rest += (f" {pron} has {bag}." if stated["bag"].get("partial") else f" {pron} carries {bag}.")
  if infrared:
    templates = [
        f"An infrared image of {subject}{with_hair}{wearing}{carrying}.",
        f"A grayscale thermal photo shows {subject} {view}{wearing}{carrying}.{(' ' + pron + ' has ' + hair + '.') if hair else ''}",
        f"Infrared view of {subject} {view}{with_hair}{wearing}{carrying}.",
    ]
  else:
    templates = [
        f"{subject.capitalize()}{with_hair}{wearing}{carrying}.",
        f"The pedestrian is {subject} {view}{wearing}.{sentence_rest}",
        f"{subject.capitalize()} {view}{wearing}{with_hair}{carrying}.",
        f"This image shows {subject}{with_hair}{wearing}{carrying}.",
    ]
  text = templates[int(rng.integers(len(templates)))]
  return text, {"visible": parts, "stated": stated}
