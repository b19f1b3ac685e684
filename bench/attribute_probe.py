"""How much of a synthetic set the small image tower can learn when told the attributes outright.

  python -m bench.attribute_probe --root data/synthetic --steps 600

Trains the synthetic config's image tower (configs/synthetic.py `model.vision`, from scratch) with
one cross-entropy per attribute that both modalities show (identities.SHARED_ATTRIBUTES: shapes,
garments and belongings, no colour, no material), on the training identities of the holdout split
(exp/train_id.txt), with the true attribute values from synthetic.json. Then it ranks the val
identities (SYSU-MM01 all-search protocol, infrared queries against visible galleries) by the
cosine of the predicted attribute distributions (the concatenated softmaxes).

That is a learnability ceiling for the tower under a budget of steps, between chance and the
attribute oracle the generator prints: EEES has to find these cues through the descriptions
(whose attributes are partly missing or wrong) and identity labels, and an EEES run far below
this probe at the same number of steps is held back by its objective, not by what the pictures
show. It never looks at the test identities.

  python -m bench.attribute_probe --root data/synthetic --train_root data/synthetic_pretrain \
      --save workdir/probe_clip --text_from data/synthetic_clip

--train_root trains on every identity of another generated set instead (e.g. a pretraining set:
other people, so how much identity diversity buys can be measured), still scoring --root's val
ids. --save writes the trained tower as a converted-CLIP folder, with the text tower (and
temperature) of the --text_from checkpoint, for `--config.model.init.checkpoint`: what EEES does
from a tower that already reads the shared attributes in both modalities.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from configs import synthetic as synthetic_config
from data_pipelines import input_pipeline, sysu_mm01
from data_pipelines.ops import CLIP_MEAN, CLIP_STD, normalize
from data_pipelines.synthetic import labels
from data_pipelines.synthetic.identities import SHARED_ATTRIBUTES
from eees_jax.evaluation import protocols
from eees_jax.models import towers


def attribute_table(root: str) -> tuple[dict[int, list[int]], list[list[str]]]:
  """labels.attribute_table of the shared attributes, with a missing set as a one-line error."""
  try:
    return labels.attribute_table(root)
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from None


def run(args) -> dict:
  table, values = attribute_table(args.root)
  if args.train_root:
    train_root = args.train_root
    train_table, train_values = attribute_table(train_root)
    if train_values != values:
      raise SystemExit(f"{train_root} and {args.root} have different attribute values "
                       f"({train_values} vs {values}); generate both with this generator version")
    records = sysu_mm01.training_records(train_root)
  else:
    train_root, train_table = args.root, table
    records = list(sysu_mm01.train_set(args.root, holdout=True).records)
  vision = dict(synthetic_config.get_config().model.vision)
  tower = towers.build_vision_tower(vision)
  key = jax.random.PRNGKey(args.seed)
  variables = tower.init(key, jnp.zeros((2, args.height, args.width, 3)), jnp.array([0, 1]))
  # The text tower the trained tower will be saved with: loaded and checked before any decoding.
  base = _text_base(args.text_from, variables["params"]) if args.save else None
  print(f"decoding {len(records)} training images of {train_root} at {args.height}x{args.width}",
        flush=True)
  x_all = input_pipeline.decode_images(train_root, records, height=args.height, width=args.width)
  y_all = np.array([train_table[labels.pid_of(r.path)] for r in records], np.int32)
  m_all = np.array([r.modality for r in records], np.int32)

  sizes = [len(v) for v in values]
  offsets = np.cumsum([0] + sizes)
  head_shape = (vision["output_dim"], sum(sizes))
  head = {"w": 0.01 * jax.random.normal(jax.random.fold_in(key, 1), head_shape),
          "b": jnp.zeros(sum(sizes))}
  params = {"tower": variables["params"], "head": head}
  batch_stats = variables["batch_stats"]
  tx = optax.adam(args.lr)
  opt_state = tx.init(params)

  def logits(p, stats, images, modality, train):
    x = normalize(images, CLIP_MEAN, CLIP_STD)
    variables = {"params": p["tower"], "batch_stats": stats}
    if train:
      out, new = tower.apply(variables, x, modality, train=True, mutable=["batch_stats"])
    else:
      out, new = tower.apply(variables, x, modality, train=False), None
    z = out["pooled"].astype(jnp.float32) @ p["head"]["w"] + p["head"]["b"]
    return [z[:, offsets[k]:offsets[k + 1]] for k in range(len(sizes))], new

  @jax.jit
  def step(p, stats, opt, images, labels, modality):
    def loss_fn(p):
      parts, new = logits(p, stats, images, modality, True)
      loss = sum(optax.softmax_cross_entropy_with_integer_labels(z, labels[:, k]).mean()
                 for k, z in enumerate(parts))
      return loss, new["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), stats, opt, loss

  @jax.jit
  def features(p, stats, images, modality):
    parts, _ = logits(p, stats, images, modality, False)
    probs = jnp.concatenate([jax.nn.softmax(z, axis=-1) for z in parts], axis=-1)
    unit = probs / jnp.linalg.norm(probs, axis=-1, keepdims=True)
    return unit, [jnp.argmax(z, -1) for z in parts]

  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  bar = tqdm(range(args.steps), desc="probe", unit="step")
  for i in bar:
    idx = rng.choice(len(records), args.batch, replace=False)
    images = x_all[idx].copy()
    mirror = rng.random(args.batch) < 0.5
    images[mirror] = images[mirror, :, ::-1]
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images, y_all[idx],
                                                m_all[idx])
    if i % 50 == 0:  # reading the loss waits for the step: not every step
      bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
  train_s = time.perf_counter() - start

  val = sysu_mm01.test_records(args.root, "val")
  feats, preds = [], []
  for b in input_pipeline.eval_dataset(args.root, val, height=args.height, width=args.width,
                                       batch_size=128):
    f, pred = features(params, batch_stats, b["images"], b["modality"])
    feats.append(np.asarray(f)[b["mask"]])
    preds.append(np.stack([np.asarray(q) for q in pred], -1)[b["mask"]])
  by_path = dict(zip((r.path for r in val), np.concatenate(feats)))
  correct = np.concatenate(preds) == np.array([table[labels.pid_of(r.path)] for r in val])
  modality = np.array([r.modality for r in val])
  accuracy = {name: dict(zip(SHARED_ATTRIBUTES, correct[modality == mod].mean(axis=0).tolist()))
              for mod, name in ((0, "visible"), (1, "infrared"))}

  def extract(recs):
    return np.stack([by_path[r.path] for r in recs])

  res = protocols.evaluate_sysu(extract, args.root, modes=("all",), trials=args.trials, split="val")
  mean = res["settings"]["all-search single-shot"]["mean"]
  if args.save:
    save_tower(args.save, base, jax.device_get(params["tower"]), jax.device_get(batch_stats))
    print(f"wrote the probe's tower to {args.save} (text tower from {args.text_from})")
  return {"rank1": float(mean["rank1"]), "mAP": float(mean["mAP"]), "train_seconds": train_s,
          "steps": args.steps, "batch": args.batch, "accuracy": accuracy}


def _text_base(text_from: str, params):
  """The converted CLIP at `text_from`, refused in one line unless its image tower has the
  shapes of `params` (the probe's tower)."""
  from eees_jax import weights as weights_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(text_from, "config.json")):
    raise SystemExit(f"--text_from {text_from}: no converted CLIP there (config.json); build one "
                     "with `python -m eees_jax.pretrain_clip --config=configs/synthetic.py`")
  base = weights_lib.load_clip(text_from)
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  if shapes(base.vision_params) != shapes(params):
    raise SystemExit(f"--text_from {text_from}: its image tower differs from configs/synthetic.py's "
                     "model.vision; give a checkpoint pretrained with this config")
  return base


def save_tower(out: str, base, params, batch_stats) -> None:
  """The probe's tower with the text tower (and temperature) of `base`, as a converted-CLIP folder."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from eees_jax import weights as weights_lib  # pylint: disable=g-import-not-at-top
  weights_lib.save_converted(dataclasses.replace(base, vision_params=params,
                                                 vision_batch_stats=batch_stats,
                                                 source="bench.attribute_probe"), out)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default="data/synthetic", help="a generated synthetic set")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--height", type=int, default=64)
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--trials", type=int, default=3, help="gallery draws of the protocol")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="also write the result as JSON here")
  p.add_argument("--train_root", default="",
                 help="train on every identity of this generated set (default: --root's "
                      "training ids)")
  p.add_argument("--save", default="",
                 help="write the trained tower as a converted-CLIP folder here")
  p.add_argument("--text_from", default="data/synthetic_clip",
                 help="with --save: the converted CLIP whose text tower goes with it")
  args = p.parse_args(argv)
  if args.save:
    if os.path.exists(args.save) and os.listdir(args.save):
      raise SystemExit(f"--save {args.save}: exists and is not empty; choose another folder")
  result = run(args)
  print(f"attribute probe, {args.steps} steps of {args.batch} images "
        f"({result['train_seconds']:.0f} s): "
        f"val all-search Rank-1 {result['rank1']:.2f} mAP {result['mAP']:.2f}")
  for name, acc in result["accuracy"].items():
    print(f"  {name} attribute accuracy: " + " ".join(f"{a} {v:.2f}" for a, v in acc.items()))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
