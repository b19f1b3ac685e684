"""Peak host memory of training and of evaluation, RN50 at 288x144 (CLIP RN50 with random weights).

  python -m bench.memory                                  # writes the "memory" section
  python -m bench.memory --eval_batch_sizes=64,16 --steps=2 --images=96

Each figure is the peak resident set (ru_maxrss) of a fresh child process that does one thing:
- train: the trainer's jitted step (`train.train_step`, donated state, every loss term, frozen
  description features) on P x K = 2 x 2 identities (12 images), compile + `--steps` steps
  (bench.train_step builds it, through the shared model-construction path);
- eval: the trainer's evaluation (`train.evaluate`'s extractor and the data set protocol of
  data_pipelines.registry) of the same model on a small synthetic test set rendered at 288x144
  (SYSU-MM01 layout), at each --eval_batch_sizes value: decoding, the jitted test-time feature with
  the flipped image, host features, scoring.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from bench._report import machine_description, write_section

HEIGHT, WIDTH = 288, 144


def _peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def child_train(steps: int) -> dict:
  from bench import train_step  # pylint: disable=g-import-not-at-top
  r = train_step.measure("rn50", 2, 2, "float32", steps)
  return {"what": "train", "images": r["batch"], "seconds_per_step": r["step_s"],
          "compile_s": r["compile_s"], "peak_gib": _peak_gib()}


def _eval_config(root: str, batch_size: int):
  from configs import common, synthetic as synthetic_config  # pylint: disable=g-import-not-at-top
  c = synthetic_config.get_config()
  c.dataset.root = root
  c.model.vision = common.rn50_vision()
  c.model.text = common.clip_text_tower()
  c.input.update(height=HEIGHT, width=WIDTH, eval_batch_size=batch_size)
  c.eval.update(modes=("all",), trials=1, ranked_list_queries=0)
  return c


def child_eval(root: str, batch_size: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipelines import registry  # pylint: disable=g-import-not-at-top
  from eees_jax import embedding, experiment, sharding  # pylint: disable=g-import-not-at-top
  cfg = _eval_config(root, batch_size)
  model = experiment.build_model(experiment.model_spec(cfg, 395, pretrained=None))
  variables = experiment.init_model_variables(model, jax.random.PRNGKey(0), HEIGHT, WIDTH)
  mesh = sharding.make_mesh(1)
  extract = embedding.RecordExtractor(
      model.eees, variables, mesh, images=registry.eval_images(cfg.dataset), height=HEIGHT,
      width=WIDTH, batch_size=batch_size, flip=True)
  start = time.perf_counter()
  records = registry.test_records(cfg)
  registry.evaluate(extract, cfg, records=records)
  total = time.perf_counter() - start
  return {"what": "eval", "batch_size": batch_size, "images": extract.images,
          "extract_s": extract.seconds, "total_s": total, "peak_gib": _peak_gib()}


def _run_child(args: list[str]) -> dict:
  cmd = [sys.executable, "-m", "bench.memory", *args]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--eval_batch_sizes", default="64,16")
  p.add_argument("--images", type=int, default=96, help="about this many test images")
  p.add_argument("--child", choices=("train", "eval"), default=None)
  p.add_argument("--root", default=None)
  p.add_argument("--batch_size", type=int, default=0)
  args = p.parse_args()
  if args.child == "train":
    print(json.dumps(child_train(args.steps)))
    return
  if args.child == "eval":
    print(json.dumps(child_eval(args.root, args.batch_size)))
    return

  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  sizes = [int(s) for s in args.eval_batch_sizes.split(",")]
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "synthetic")
    # Test ids x (4 visible + 2 infrared cameras) x 2 images; no training ids needed.
    num_test = max(args.images // 12, 2)
    synthetic.generate(root, num_ids=num_test + 4, num_test=num_test, images_per_camera=2,
                       height=HEIGHT, width=WIDTH, seed=0)
    rows = [_run_child(["--child=train", f"--steps={args.steps}"])]
    print(rows[-1], flush=True)
    for b in sizes:
      rows.append(_run_child(["--child=eval", f"--root={root}", f"--batch_size={b}"]))
      print(rows[-1], flush=True)
  load = max(load, os.getloadavg()[0])
  lines = [
      "## Peak host memory: RN50 at 288x144, training and evaluation", "",
      f"`python -m bench.memory --steps={args.steps} --eval_batch_sizes={args.eval_batch_sizes} "
      f"--images={args.images}` on {machine_description()}; one device. Each row is the peak "
      "resident set (ru_maxrss) of a fresh child process doing only that. CLIP RN50 with random "
      "weights (the memory does not depend on them); evaluation = decoding, the jitted test-time "
      "feature of each image and of its mirror image, features to the host batch by batch, the "
      "SYSU-MM01 protocol on the synthetic test set rendered at 288x144.", "",
      "| what | images | batch | time | peak RSS (GiB) |", "|---|---|---|---|---|"]
  for r in rows:
    if r["what"] == "train":
      lines.append(f"| training step (compile + {args.steps} steps) | {r['images']} per step | "
                   f"{r['images']} | {r['seconds_per_step']:.1f} s/step | {r['peak_gib']:.2f} |")
    else:
      lines.append(f"| evaluation | {r['images']} | {r['batch_size']} | "
                   f"{r['extract_s']:.0f} s features, {r['total_s']:.0f} s in all | "
                   f"{r['peak_gib']:.2f} |")
  if load > (os.cpu_count() or 1):
    lines += ["", f"The machine was busy (load average up to {load:.1f} on {os.cpu_count()} "
              "cores, other jobs running): the times are slower than on an idle machine; the "
              "memory figures are not affected."]
  write_section("memory", "\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
