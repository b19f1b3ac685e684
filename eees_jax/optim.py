"""Optimiser: Adam with L2 weight decay, parameter groups by regex, warm-up + step schedule.

Parameter groups follow big_vision: the '/'-joined path of every parameter is matched against the
regexes of `config.optim.groups` in order; the first match gives the group's learning-rate multiplier,
and a multiplier of 0 freezes the parameter (its update and its weight decay are zero).

Linear probe, then fine-tune (Kumar et al. 2022, "Fine-tuning can distort pretrained features"):
with `optim.probe_epochs` > 0 the parameters matching `optim.probe_frozen` get no update for that
many epochs, so the fresh heads (BNNecks, classifiers) are fitted to the pretrained features before
their gradients reach the tower. Off by default: on the synthetic holdout it did not stop the first
epoch's loss (docs/synthetic_benchmark.md, "Where the stage loses the tower").
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def param_paths(params: Any) -> dict[tuple[str, ...], str]:
  return {k: "/".join(k) for k in traverse_util.flatten_dict(params)}


def group_labels(params: Any, groups: Sequence[tuple[str, float]]) -> tuple[Any, dict[str, float]]:
  """Labels every leaf of `params` with its group; returns (label tree, label -> multiplier).

  Raises if a parameter matches no regex, so a config can never silently leave a tensor untrained.
  """
  compiled = [(re.compile(rx), float(mult)) for rx, mult in groups]
  flat = traverse_util.flatten_dict(params)
  labels, mults = {}, {}
  for key in flat:
    path = "/".join(key)
    for i, (rx, mult) in enumerate(compiled):
      if rx.search(path):
        labels[key] = f"group{i}"
        mults[f"group{i}"] = mult
        break
    else:
      raise ValueError(f"parameter {path!r} matches none of config.optim.groups "
                       f"{[rx for rx, _ in groups]}; add a catch-all '.*' group")
  return traverse_util.unflatten_dict(labels), mults


def lr_schedule(base_lr: float, steps_per_epoch: int, warmup_epochs: float, warmup_from: float,
                milestones: Sequence[int], gamma: float) -> Callable[[Any], Any]:
  """Linear warm-up from `warmup_from * base_lr` over `warmup_epochs`, then x`gamma` at each milestone."""
  warmup_steps = max(int(round(warmup_epochs * steps_per_epoch)), 0)
  # join_schedules hands the second schedule the step count since the join.
  boundaries = {int(m * steps_per_epoch) - warmup_steps: gamma for m in milestones}
  decay = optax.piecewise_constant_schedule(base_lr, boundaries)
  if warmup_steps == 0:
    return decay
  warm = optax.linear_schedule(base_lr * warmup_from, base_lr, warmup_steps)
  return optax.join_schedules([warm, decay], [warmup_steps])


def probe_steps(optim_cfg: Any, steps_per_epoch: int) -> int:
  """Steps of the linear-probe phase (0: none)."""
  return max(int(round(float(optim_cfg.get("probe_epochs", 0.0)) * steps_per_epoch)), 0)


def probe_labels(params: Any, frozen_regex: str) -> Any:
  """True for every leaf whose '/'-joined path matches `frozen_regex` (frozen while probing)."""
  rx = re.compile(frozen_regex)
  paths = param_paths(params)
  found = {k: bool(rx.search(path)) for k, path in paths.items()}
  if not any(found.values()):
    raise ValueError(f"config.optim.probe_frozen {frozen_regex!r} matches no parameter; the probe "
                     f"phase would freeze nothing (parameters look like {next(iter(paths.values()))!r})")
  return traverse_util.unflatten_dict(found)


def make_optimizer(params: Any, optim_cfg: Any, steps_per_epoch: int) -> tuple[optax.GradientTransformation, Callable]:
  """The optax transformation for `params` (a tree with top-level groups like model/, pair/, text/)."""
  schedule = lr_schedule(optim_cfg.lr, steps_per_epoch, optim_cfg.warmup_epochs, optim_cfg.warmup_from,
                         optim_cfg.milestones, optim_cfg.gamma)
  labels, mults = group_labels(params, optim_cfg.groups)
  n_probe = probe_steps(optim_cfg, steps_per_epoch)
  if n_probe:
    frozen = probe_labels(params, optim_cfg.probe_frozen)
    labels = jax.tree_util.tree_map(lambda g, f: f"{g}_probe" if f else g, labels, frozen)
    mults.update({f"{g}_probe": m for g, m in list(mults.items())})

  def group_tx(mult: float, probed: bool) -> optax.GradientTransformation:
    if mult == 0.0:
      return optax.set_to_zero()
    # No update (nor weight decay) before the probe ends; Adam's moments still see the gradients.
    gate = (lambda step: (step >= n_probe).astype(jnp.float32)) if probed else (lambda step: 1.0)
    # torch.optim.Adam(weight_decay=wd) semantics: L2 term added to the gradient before Adam.
    return optax.chain(
        optax.add_decayed_weights(optim_cfg.weight_decay),
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=1e-8),
        optax.scale_by_schedule(lambda step: -mult * schedule(step) * gate(step)),
    )

  tx = optax.multi_transform(
      {label: group_tx(m, label.endswith("_probe")) for label, m in mults.items()}, labels)
  if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), tx)
  return tx, schedule
