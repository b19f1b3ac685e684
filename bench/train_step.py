"""Train-step throughput: compile time, images/s, XLA FLOPs, achieved FLOP/s, peak host memory.

  python -m bench.train_step --model=synthetic --P=8 --K=4
  python -m bench.train_step --model=rn50 --P=8 --K=4 --steps=3
  python -m bench.train_step --model=rn50 --P=8 --K=4 --dtype=bfloat16

Random uint8 batches and random (frozen) description features stand in for data: the step is the
trainer's own `train.train_step`, with every loss term on, jitted with donated state on one device.
The matmul reference (a large float32 matmul measured in the same run) gives the fraction of this
machine's practical peak that the step achieves.
"""
from __future__ import annotations

import argparse
import functools
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._report import machine_description, write_section
from configs import common, synthetic as synthetic_config
from eees_jax import optim, train
from eees_jax.models import eees as eees_lib


def _config(model: str):
  return synthetic_config.get_config() if model == "synthetic" else common.base_config()


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times) / 1e9


def measure(model_name: str, P: int, K: int, dtype: str, steps: int, num_classes: int = 395) -> dict:
  cfg = _config(model_name)
  h, w = cfg.input.height, cfg.input.width
  n = 3 * P * K
  model = eees_lib.EEES(vision=cfg.model.vision.to_dict(), num_classes=num_classes,
                        gem_p=cfg.model.gem_p, dtype=train._dtype(dtype))
  key = jax.random.PRNGKey(0)
  variables = jax.jit(functools.partial(model.init, train=False))(
      key, jnp.zeros((2, h, w, 3)), jnp.array([0, 1], jnp.int32))
  dim = cfg.model.text.embed_dim
  params = {"model": variables["params"]}
  tx, _ = optim.make_optimizer(params, cfg.optim, steps_per_epoch=100)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=variables["batch_stats"], opt_state=tx.init(params), rng=key)
  rng = np.random.default_rng(0)
  labels = np.tile(np.repeat(np.arange(P), K), 3).astype(np.int32)
  batch = {"images": jnp.asarray(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)),
           "labels": jnp.asarray(labels),
           "modality": jnp.asarray(np.repeat([0, 0, 1], P * K).astype(np.int32)),
           "desc": jnp.asarray(np.arange(n, dtype=np.int32))}
  text = {"index": jnp.arange(n, dtype=jnp.int32),
          "features": jnp.asarray(rng.standard_normal((n, dim)).astype(np.float32))}
  step = jax.jit(functools.partial(train.train_step, model=model, text_model=None, tx=tx,
                                   loss_cfg=cfg.loss), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, text).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  state, m = compiled(state, batch, text)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch, text)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  return dict(model=model_name, P=P, K=K, batch=n, size=f"{h}x{w}", dtype=dtype, compile_s=compile_s,
              step_s=med, images_s=n / med, gflop_step=flops / 1e9, gflops=flops / med / 1e9,
              peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=("synthetic", "rn50"), default="synthetic")
  p.add_argument("--P", type=int, default=8)
  p.add_argument("--K", type=int, default=4)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args()
  ref = matmul_gflops()
  r = measure(args.model, args.P, args.K, args.dtype, args.steps)
  r["matmul_fraction"] = r["gflops"] / ref
  row = (f"| {r['model']} | {r['size']} | {r['P']}x{r['K']} ({r['batch']}) | {r['dtype']} | "
         f"{r['compile_s']:.1f} | {r['step_s']:.2f} | {r['images_s']:.1f} | {r['gflop_step']:.0f} | "
         f"{r['gflops']:.0f} | {ref:.0f} | {r['matmul_fraction']:.2f} | {r['peak_rss_gib']:.1f} |")
  print(row)
  cmd = f"python -m bench.train_step --model={args.model} --P={args.P} --K={args.K} --dtype={args.dtype} --steps={args.steps}"
  write_section(f"train_step_{args.model}_{args.P}x{args.K}_{args.dtype}", "\n".join([
      f"## Train step: {args.model}, P={args.P} K={args.K}, {args.dtype}", "",
      f"`{cmd}` on {machine_description()}. Median of {args.steps} steps after warm-up; XLA cost "
      "analysis FLOPs (whole step); matmul = a 2048^2 float32 matmul in the same run.", "",
      "| model | input | PxK (images) | dtype | compile (s) | step (s) | images/s | GFLOP/step | "
      "GFLOP/s | matmul GFLOP/s | fraction | peak RSS (GiB) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|", row]))


if __name__ == "__main__":
  main()
