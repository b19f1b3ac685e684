"""Checks a whole experiment config before any work starts.

`validate(config)` looks at every value the trainer reads and raises one ConfigError listing every
bad one, each with its key, its value and what is allowed, so a typo costs seconds instead of a
training run (a learning rate of -1 would otherwise train, then fail in evaluation). The allowed
values come from the modules that read them (the data set registry, the protocols, the losses).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")          # model.dtype: the compute dtype
TOWERS = ("vision", "text")                          # model.init.load
VISION_KINDS = ("resnet", "vit")
# model.vision.remat (ResNet): eees_jax.models.clip_resnet.REMAT_STAGES, which a test keeps equal.
REMAT_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
INTERPOLATIONS = ("bicubic", "bilinear")             # positional-embedding resizing
CMSP_INTRA = ("mean", "hardest")
DISTANCES = ("euclidean", "cosine")
LOSS_TERMS = ("id", "wrt", "ese", "cvsc", "cmsp", "dc")
# config.eval options that only some protocols read (data_pipelines.registry: eval_options).
PROTOCOL_EVAL_OPTIONS = ("modes", "shots", "gallery_source", "llcm_layout")
_MISSING = object()

# Keys that change speed or logging, never a number: a finished run may be reused across them
# (eees_jax.ablation) and a run may be resumed with them changed.
RESULT_NEUTRAL = ("input.threads", "input.cache_decoded", "train.log_every_steps")
# What a resumed run may also change: none of it changes the steps already taken. Where the run
# stops (epochs, max_steps), how often it saves or evaluates, what and how the evaluation reports,
# how the state is placed on the devices (FSDP or not; the device count changes float rounding
# only) and which ResNet stages are recomputed in the backward pass (model.vision.remat: the same
# function, float rounding at most). A key ending in "." covers its whole section.
RESUME_NEUTRAL = RESULT_NEUTRAL + (
    "train.epochs", "train.max_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.eval_every_epochs", "input.eval_batch_size", "eval.", "mesh.", "model.vision.remat")


class ConfigError(ValueError):
  """Invalid config values; the message lists each as `key = value: what is allowed`."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    n = len(self.problems)
    super().__init__(f"the config has {n} invalid value{'s' if n > 1 else ''} (nothing was run); "
                     "fix them in the config file or with --config.<key>=<value>:\n  "
                     + "\n  ".join(self.problems))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
  """Collects problems; each check names its dotted key and what the key allows."""

  def __init__(self, config: Any):
    self.config = config
    self.problems: list[str] = []

  def get(self, key: str, default: Any = _MISSING) -> Any:
    node = self.config
    for part in key.split("."):
      try:
        node = node[part]
      except (KeyError, TypeError, AttributeError):
        if default is _MISSING:
          self.problems.append(f"{key}: missing (every config starts from configs/common.py: "
                               "base_config())")
        return _MISSING if default is _MISSING else default
    return node

  def bad(self, key: str, value: Any, allowed: str) -> None:
    self.problems.append(f"{key} = {value!r}: {allowed}")

  def check(self, key: str, ok: Callable[[Any], bool], allowed: str) -> Any:
    """The value of `key` if present and ok(value); otherwise records a problem (returns _MISSING)."""
    value = self.get(key)
    if value is _MISSING:
      return _MISSING
    try:
      good = ok(value)
    except (TypeError, ValueError, re.error):
      good = False
    if not good:
      self.bad(key, value, allowed)
      return _MISSING
    return value

  def one_of(self, key: str, choices: Sequence[Any]) -> Any:
    return self.check(key, lambda v: v in tuple(choices),
                      "one of " + ", ".join(str(c) for c in choices))

  def boolean(self, key: str) -> Any:
    return self.check(key, lambda v: isinstance(v, bool), "True or False")

  def integer(self, key: str, lo: int | None = None, hi: int | None = None) -> Any:
    what = "an integer" + (f" >= {lo}" if lo is not None and hi is None else "") + (
        f" in {lo}..{hi}" if lo is not None and hi is not None else "")
    return self.check(key, lambda v: _is_int(v) and (lo is None or v >= lo)
                      and (hi is None or v <= hi), what)

  def number(self, key: str, lo: float | None = None, lo_open: bool = False,
             hi: float | None = None, hi_open: bool = False) -> Any:
    parts = []
    if lo is not None:
      parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
      parts.append(f"{'<' if hi_open else '<='} {hi:g}")

    def ok(v):
      if not _is_number(v):
        return False
      if lo is not None and (v <= lo if lo_open else v < lo):
        return False
      return hi is None or (v < hi if hi_open else v <= hi)

    return self.check(key, ok, "a finite number" + (" " + " and ".join(parts) if parts else ""))

  def string(self, key: str, nonempty: bool = False) -> Any:
    return self.check(key, lambda v: isinstance(v, str) and (bool(v) or not nonempty),
                      "a non-empty string" if nonempty else "a string")


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """A nested dict (a config's to_dict()) as {'section.key': value}."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


# Options added after runs were recorded, with the value that does what their absence did (None:
# any value, the option acts only through another one listed here). A run recorded before the
# option existed still resumes, and an ablation still reuses it, under a config holding that value.
ADDED_OPTIONS = {
    "optim.probe_epochs": 0.0,
    "optim.probe_frozen": None,
    "pretrain.visible_only": False,
    "pretrain.data.generate.visible_only": False,
    "pretrain.input_size": [],   # as JSON records (); empty: config.input's size, as before
}


def _absent_as_before(key: str, recorded: dict, wanted: dict) -> bool:
  if key in recorded or key not in ADDED_OPTIONS:
    return False
  neutral = ADDED_OPTIONS[key]
  return neutral is None or wanted.get(key) == neutral


def differences(recorded: dict, wanted: dict, neutral: Sequence[str] = RESULT_NEUTRAL) -> list[str]:
  """'key: <recorded> there, <wanted> now' for every differing key of two configs (as JSON dicts)
  outside `neutral` (exact keys, or sections given as "name."); a key of ADDED_OPTIONS that the
  recorded config lacks counts as its old behaviour."""
  a, b = flat(recorded), flat(wanted)
  keys = sorted(k for k in set(a) | set(b)
                if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in neutral)
                and not _absent_as_before(k, a, b))
  missing = "(absent)"
  return [f"{k}: {a.get(k, missing)!r} there, {b.get(k, missing)!r} now"
          for k in keys if a.get(k, missing) != b.get(k, missing)]


def _tuple_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda v: isinstance(v, (tuple, list)) and all(check(x) for x in v)


def validate(config: Any) -> None:
  """Raises ConfigError listing every invalid value of an experiment config (configs/*.py)."""
  c = _Checker(config)
  c.integer("seed")
  spec = _dataset(c)
  _input(c)
  _model(c)
  c.string("text.tokenizer", nonempty=True)
  c.boolean("text.trainable")
  c.integer("text.embed_batch_size", 1)
  _loss(c)
  _optim(c)
  _train(c)
  _eval(c, spec)
  c.check("mesh.data", lambda v: _is_int(v) and (v == -1 or v >= 1),
          "-1 (every device) or an integer >= 1")
  c.boolean("mesh.fsdp")
  c.integer("mesh.fsdp_min_size", 0)
  if c.problems:
    raise ConfigError(c.problems)


def _dataset(c: _Checker):
  """Checks config.dataset; returns its registry entry (None when the name is unknown)."""
  from data_pipelines import descriptions, registry  # pylint: disable=g-import-not-at-top
  name = c.one_of("dataset.name", registry.names())
  spec = registry.get(name) if name is not _MISSING else None
  source = c.one_of("dataset.source", registry.SOURCES)
  root = c.string("dataset.root")
  holdout = c.boolean("dataset.holdout")
  c.string("dataset.descriptions", nonempty=True)
  c.one_of("dataset.description_field", descriptions.FIELDS)
  data_dir = c.string("dataset.tfds_data_dir")
  if source == "tfds" and data_dir == "":
    c.bad("dataset.tfds_data_dir", data_dir, "the TFDS data_dir the data set was prepared into "
          "(python -m data_pipelines.prepare_tfds), needed with dataset.source=tfds")
  if spec is None:
    return None
  if spec.splits:
    c.one_of("dataset.split", spec.splits)
  if holdout is True and not spec.holdout:
    c.bad("dataset.holdout", True, f"False: {spec.title} has no validation id list (only data "
          "sets in the SYSU-MM01 layout, with exp/val_id.txt, have one)")
  elif holdout is True and source == "tfds":
    c.bad("dataset.holdout", True, "False with dataset.source=tfds (the prepared splits do not "
          "hold the val ids); tune with dataset.source=folders")
  if spec.generated:
    c.integer("dataset.generate.num_ids", 2)
    c.integer("dataset.generate.images_per_camera", 1)
    c.integer("dataset.generate.height", 1)
    c.integer("dataset.generate.width", 1)
    c.integer("dataset.generate.seed")
    c.number("dataset.generate.val_fraction", 0.0, hi=1.0, hi_open=True)
  elif source == "folders" and isinstance(root, str) and "://" not in root \
      and not os.path.isdir(root):
    c.bad("dataset.root", root, f"the unpacked data set folder. {spec.download_hint}")
  return spec


def _input(c: _Checker) -> None:
  c.integer("input.height", 1)
  c.integer("input.width", 1)
  c.integer("input.P", 2)   # identities per step: a batch of one identity has no negatives
  c.integer("input.K", 1)
  c.boolean("input.cache_decoded")
  c.integer("input.threads", 0)
  c.integer("input.eval_batch_size", 1)
  aug = c.get("input.aug")
  if aug is not _MISSING:
    from data_pipelines import augment  # pylint: disable=g-import-not-at-top (TensorFlow)
    try:
      augment.AugConfig.from_mapping(aug)
    except (ValueError, TypeError) as e:
      c.problems.append(f"input.aug: {e}")


def _model(c: _Checker) -> None:
  c.one_of("model.dtype", DTYPES)
  c.number("model.gem_p", 0.0, lo_open=True)
  c.boolean("model.freeze_encoder_bn")
  c.string("model.init.checkpoint")
  c.check("model.init.load", lambda v: isinstance(v, (tuple, list)) and len(set(v)) == len(v)
          and set(v) <= set(TOWERS), f"a tuple of distinct tower names out of {', '.join(TOWERS)}")
  kind = c.one_of("model.vision.kind", VISION_KINDS)
  c.one_of("model.vision.interpolation", INTERPOLATIONS)
  c.one_of("model.vision.num_modalities", (1, 2))
  if kind == "resnet":
    c.check("model.vision.layers", lambda v: _tuple_of(lambda x: _is_int(x) and x >= 1)(v)
            and len(v) == 4, "four block counts >= 1, e.g. (3, 4, 6, 3)")
    for key in ("width", "output_dim", "heads", "pos_grid"):
      c.integer(f"model.vision.{key}", 1)
    c.one_of("model.vision.last_stride", (1, 2))
    if c.get("model.vision.remat", None) is not None:
      c.check("model.vision.remat", lambda v: _tuple_of(lambda x: x in REMAT_STAGES)(v)
              and len(set(v)) == len(v),
              "a tuple of distinct stages out of " + ", ".join(REMAT_STAGES) + " (() for none)")
  for key in ("vocab_size", "context_length", "width", "heads", "layers", "embed_dim"):
    c.integer(f"model.text.{key}", 1)
  width, heads = c.get("model.text.width", None), c.get("model.text.heads", None)
  if _is_int(width) and _is_int(heads) and heads >= 1 and width % heads:
    c.bad("model.text.heads", heads, f"a divisor of model.text.width={width}")
  vocab = c.get("model.text.vocab_size", None)
  c.check("model.text.eos_token_id", lambda v: v is None or (
      _is_int(v) and v >= 0 and (not _is_int(vocab) or v < vocab)),
          "unset (end of text = the highest token id, as OpenAI's CLIP) or a token id of the "
          "vocabulary")


def _loss(c: _Checker) -> None:
  from eees_jax import losses  # pylint: disable=g-import-not-at-top (JAX)
  enabled = []
  for term in LOSS_TERMS:
    if c.boolean(f"loss.{term}.enabled") is True:
      enabled.append(term)
    c.number(f"loss.{term}.weight", 0.0)
  if not enabled:
    c.problems.append(f"loss: no term enabled; enable at least one of {', '.join(LOSS_TERMS)}")
  c.number("loss.id.label_smoothing", 0.0, hi=1.0, hi_open=True)
  c.number("loss.ese.tau", 0.0, lo_open=True)
  c.boolean("loss.ese.within_modality")
  c.one_of("loss.pair.kind", losses.PAIR_KINDS)
  c.integer("loss.pair.num_heads", 1)
  c.number("loss.cvsc.tau", 0.0, lo_open=True)
  c.number("loss.cvsc.kd_temperature", 0.0, lo_open=True)
  intra = c.one_of("loss.cmsp.intra", CMSP_INTRA)
  c.one_of("loss.cmsp.distance", DISTANCES)
  k = c.check("loss.cmsp.hardest_k", lambda v: v is None or (_is_int(v) and v >= 1),
              "unset or an integer >= 1")
  if intra == "hardest" and k is None:
    c.bad("loss.cmsp.hardest_k", None, "an integer >= 1 with loss.cmsp.intra=hardest (CSDN's "
          "K - 1); set --config.loss.cmsp.hardest_k")
  elif intra == "mean" and _is_int(k):
    c.bad("loss.cmsp.hardest_k", k, "unset with loss.cmsp.intra=mean (it is read only with "
          "intra=hardest)")
  c.check("loss.dc.hardest_k", lambda v: v is None or (_is_int(v) and v >= 1),
          "unset (mean over all intra partners) or an integer >= 1")
  c.one_of("loss.dc.distance", DISTANCES)


def _valid_groups(groups) -> bool:
  if not isinstance(groups, (tuple, list)) or not groups:
    return False
  for group in groups:
    regex, mult = group
    re.compile(regex)
    if not _is_number(mult) or mult < 0:
      return False
  return True


def _optim(c: _Checker) -> None:
  c.number("optim.lr", 0.0, lo_open=True)
  c.number("optim.weight_decay", 0.0)
  c.number("optim.b1", 0.0, hi=1.0, hi_open=True)
  c.number("optim.b2", 0.0, hi=1.0, hi_open=True)
  c.number("optim.grad_clip", 0.0)
  c.check("optim.groups", _valid_groups,
          "a non-empty tuple of (regex, learning-rate multiplier >= 0) pairs with valid regexes")
  c.number("optim.warmup_epochs", 0.0)
  c.number("optim.warmup_from", 0.0, lo_open=True, hi=1.0)
  c.check("optim.milestones", lambda v: _tuple_of(lambda x: _is_number(x) and x >= 0)(v)
          and list(v) == sorted(set(v)), "increasing epochs >= 0, e.g. (40, 70)")
  c.number("optim.gamma", 0.0, lo_open=True)
  c.number("optim.probe_epochs", 0.0)
  # check() turns re.error into a reported bad value, as for optim.groups.
  c.check("optim.probe_frozen", lambda v: isinstance(v, str) and bool(v) and bool(re.compile(v)),
          "a valid regular expression over parameter paths")


def _train(c: _Checker) -> None:
  c.integer("train.epochs", 1)
  c.integer("train.log_every_steps", 1)
  c.integer("train.checkpoint_every_steps", 0)
  c.integer("train.keep_checkpoints", 1)
  c.integer("train.eval_every_epochs", 0)
  c.check("train.max_steps", lambda v: _is_int(v) and (v == -1 or v >= 1),
          "-1 (train all epochs) or an integer >= 1")


def _eval(c: _Checker, spec) -> None:
  from data_pipelines import sysu_mm01  # pylint: disable=g-import-not-at-top
  from eees_jax.evaluation import protocols  # pylint: disable=g-import-not-at-top
  c.boolean("eval.flip")
  reads = set(spec.eval_options) if spec is not None else set(PROTOCOL_EVAL_OPTIONS)
  title = spec.title if spec is not None else "this data set"
  modes = c.check("eval.modes", _tuple_of(lambda m: m in protocols.SYSU_MODES),
                  f"a tuple out of {', '.join(protocols.SYSU_MODES)}")
  shots = c.check("eval.shots", lambda v: _tuple_of(lambda s: _is_int(s) and s >= 1)(v) and v,
                  "a non-empty tuple of integers >= 1 (1 single-shot, 10 multi-shot)")
  if "modes" in reads and modes is not _MISSING and not modes:
    c.bad("eval.modes", modes, f"at least one SYSU-MM01 search mode for {title}, e.g. ('all',)")
  elif "modes" not in reads and modes:
    c.bad("eval.modes", modes, f"() for {title}: search modes belong to the SYSU-MM01 protocol")
  if "shots" not in reads and shots is not _MISSING and tuple(shots) != (1,):
    c.bad("eval.shots", shots, f"(1,) for {title}: multi-shot galleries belong to SYSU-MM01")
  c.integer("eval.trials", 1)
  source = c.one_of("eval.gallery_source", sysu_mm01.GALLERY_SOURCES)
  if source == "official":
    if "gallery_source" not in reads:
      c.bad("eval.gallery_source", source, f"random for {title}: rand_perm_cam.mat is SYSU-MM01's")
    elif c.get("dataset.source", None) == "tfds":
      c.bad("eval.gallery_source", source, "random with dataset.source=tfds (the official gallery "
            "is read from exp/rand_perm_cam.mat in the data set folder)")
    elif c.get("dataset.holdout", None) is True:
      c.bad("eval.gallery_source", source, "random with dataset.holdout=True (the official "
            "galleries cover the test ids only)")
  layout = c.one_of("eval.llcm_layout", protocols.LLCM_LAYOUTS)
  if "llcm_layout" not in reads and layout not in (_MISSING, protocols.LLCM_LAYOUTS[0]):
    c.bad("eval.llcm_layout", layout, f"{protocols.LLCM_LAYOUTS[0]} for {title}: the layout "
          "option belongs to LLCM")
  c.boolean("eval.rerank.enabled")
  c.integer("eval.rerank.k1", 1)
  c.integer("eval.rerank.k2", 1)
  c.number("eval.rerank.lambda_value", 0.0, hi=1.0)
  c.integer("eval.ranked_list_queries", 0)
  c.one_of("eval.best_metric", tuple(f"rank{k}" for k in protocols.RANKS) + ("mAP", "mINP"))
  text = c.boolean("eval.text_retrieval")
  if text is True and spec is not None and spec.protocol != "sysu":
    c.bad("eval.text_retrieval", text, f"False for {title}: text-to-person retrieval is scored on "
          "data sets in the SYSU-MM01 layout (sysu, synthetic)")

