"""Train-step throughput: compile time, images/s, FLOPs, achieved FLOP/s, MFU, peak host memory.

  python -m bench.train_step --model=synthetic --P=8 --K=4
  python -m bench.train_step --model=synthetic --sweep=8x4,16x4,32x4
  python -m bench.train_step --model=rn50 --P=8 --K=4 --steps=3
  python -m bench.train_step --model=rn50 --P=8 --K=4 --dtype=bfloat16 --peak_tflops=989

Random uint8 batches and random (frozen) description features stand in for data: the step is the
trainer's own `train.train_step`, with every loss term on, jitted with donated state on one device.
TensorFlow is not imported (the step needs none), so this runs on a JAX-only GPU host.

Two FLOP counts are reported per step and per image:
- XLA: the compiled step's cost analysis (every op, elementwise ones included);
- mm+conv: only matrix products and convolutions, counted from the optimised HLO by
  `matmul_conv_flops` (the usual "model FLOPs" convention of PyTorch counters, so comparable
  with FLOPs counted that way for a reference implementation).
Achieved GFLOP/s uses mm+conv; MFU = achieved / --peak_tflops (the accelerator's dense peak for the
dtype, e.g. 989 for H100 SXM bf16); the matmul reference (a large float32 matmul measured in the
same run) gives the fraction of this machine's practical peak that the step achieves.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench._report import machine_description, write_section
from configs import common, synthetic as synthetic_config
from eees_jax import experiment, train, xla_cpu


# --- matmul / convolution FLOPs from optimised HLO ------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"
                    r"([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")


def _dims(shape: str) -> list[int]:
  """First array shape in an HLO type string ('f32[2,3]{1,0}' or a tuple) -> [2, 3]."""
  m = _ARRAY.search(shape)
  if m is None:
    raise ValueError(f"no array shape in HLO type {shape!r}")
  return [int(d) for d in m.group(1).split(",") if d]


def _operands(rest: str) -> list[str]:
  """Operand names of an instruction from the text after its opening parenthesis."""
  depth, end = 1, 0
  for end, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def _conv_flops(labels: str, k: list[int], out: list[int]) -> float:
  """2 * |output| * |kernel| / out_features for a convolution with dim_labels 'lhs_rhs->out',
  kernel shape k and output shape out (both of the forward convolution)."""
  rhs = labels.split("_")[1].split("->")[0]
  if len(k) != len(rhs):
    raise ValueError(f"kernel shape {k} does not match dim_labels {labels}")
  return 2.0 * float(np.prod(out)) * float(np.prod(k)) / k[rhs.index("o")]


def matmul_conv_flops(hlo_text: str) -> dict[str, float]:
  """Matrix-product and convolution FLOPs of an optimised HLO module (`compiled.as_text()`).

  Counts every `dot` (2 * |output| * contracted size) and `convolution` (2 * |output| * kernel
  window * input features per group), wherever they sit (inside fusions too), and the library calls
  GPU compilers turn them into: cuBLAS/cuBLASLt gemm custom-calls (dimension numbers from their
  backend config) and cuDNN convolution custom-calls (forward, backward-input and backward-filter,
  each counted as its forward-equivalent convolution). A computation called several times is
  counted once per definition: right for straight-line steps like this one (no while loops).
  Returns {'dot': flops, 'conv': flops, 'total': flops}.
  """
  shapes: dict[str, list[int]] = {}
  instrs = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m is None:
      continue
    name, shape, op, rest = m.groups()
    try:
      shapes[name] = _dims(shape)
    except ValueError:  # token[] / tuple-of-nothing values carry no FLOPs
      continue
    instrs.append((name, op, rest))
  counts = {"dot": 0.0, "conv": 0.0}
  for name, op, rest in instrs:
    args = _operands(rest)
    if op == "dot":
      lhs = shapes[args[0]]
      contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
      size = np.prod([lhs[int(d)] for d in contract.split(",") if d])
      counts["dot"] += 2.0 * float(np.prod(shapes[name])) * float(size)
    elif op == "convolution":
      labels = re.search(r"dim_labels=([\w>\-]+)", rest).group(1)
      counts["conv"] += _conv_flops(labels, shapes[args[1]], shapes[name])
    elif op == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      target = target.group(1) if target else ""
      if "gemm" in target or "matmul" in target:
        contract = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
        if contract is None:
          raise ValueError(f"gemm custom-call {name} has no dot dimension numbers")
        lhs = shapes[args[0]]
        size = np.prod([lhs[int(d)] for d in json.loads(f"[{contract.group(1)}]")])
        counts["dot"] += 2.0 * float(np.prod(shapes[name])) * float(size)
      elif target.startswith("__cudnn$conv"):
        labels = re.search(r"dim_labels=([\w>\-]+)", rest).group(1)
        if "BackwardInput" in target:  # (dy, w) -> dx: forward output dy, kernel w
          counts["conv"] += _conv_flops(labels, shapes[args[1]], shapes[args[0]])
        elif "BackwardFilter" in target:  # (x, dy) -> dw
          counts["conv"] += _conv_flops(labels, shapes[name], shapes[args[1]])
        else:  # forward, possibly fused with bias / activation
          counts["conv"] += _conv_flops(labels, shapes[args[1]], shapes[name])
  counts["total"] = counts["dot"] + counts["conv"]
  return counts


# --- the step -----------------------------------------------------------------------------------

def _config(model: str):
  return synthetic_config.get_config() if model == "synthetic" else common.base_config()


def matmul_gflops(n: int, reps: int = 5) -> float:
  """Practical float32 matmul GFLOP/s of the default device (an n x n product)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times) / 1e9


def build(model_name: str, P: int, K: int, dtype: str, num_classes: int = 395):
  """The trainer's jitted step compiled for a random batch of 3PK images.

  Returns (compiled, state, batch, text, compile_s).
  """
  cfg = _config(model_name)
  cfg.model.dtype = dtype
  return build_step(cfg, P, K, num_classes)


def build_step(cfg, P: int, K: int, num_classes: int = 395, variables: dict | None = None,
               seed: int = 0, donate: bool = True):
  """The trainer's jitted step (donated state unless `donate` is False) for config `cfg`,
  compiled for a batch of 3PK random uint8 images (V, Vc, R: labels repeated per view, modality
  0, 0, 1) and random frozen description features; `variables` ({'params', 'batch_stats'} of the
  EEES module) replaces the fresh model.

  Returns (compiled, state, batch, text, compile_s).
  """
  cfg.text.trainable = False  # frozen description features, as the real recipe
  h, w = cfg.input.height, cfg.input.width
  n = 3 * P * K
  model = experiment.build_model(experiment.model_spec(cfg, num_classes, pretrained=None))
  tx, _ = experiment.make_optimizer(cfg, model, steps_per_epoch=100)
  if variables is None:
    state = experiment.init_state(cfg, model, tx, pretrained=None)
  else:
    state = state_from_variables(cfg, model, tx, variables)
  dim = cfg.model.text.embed_dim
  rng = np.random.default_rng(seed)
  labels = np.tile(np.repeat(np.arange(P), K), 3).astype(np.int32)
  batch = {"images": jnp.asarray(rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)),
           "labels": jnp.asarray(labels),
           "modality": jnp.asarray(np.repeat([0, 0, 1], P * K).astype(np.int32)),
           "desc": jnp.asarray(np.arange(n, dtype=np.int32))}
  text = {"index": jnp.arange(n, dtype=jnp.int32),
          "features": jnp.asarray(rng.standard_normal((n, dim)).astype(np.float32))}
  step = jax.jit(functools.partial(train.train_step, model=model.eees, text_model=None, tx=tx,
                                   loss_cfg=cfg.loss), donate_argnums=(0,) if donate else (),
                 compiler_options=xla_cpu.compiler_options())  # as the trainer's
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, text).compile()
  compile_s = time.perf_counter() - t0
  return compiled, state, batch, text, compile_s


def state_from_variables(cfg, model: experiment.Model, tx, variables: dict) -> experiment.TrainState:
  """A fresh train state whose EEES module holds `variables` ({'params', 'batch_stats'}: the tree
  and shapes of the model's, else ValueError naming the difference), without running the model's
  initialiser (its structure comes from jax.eval_shape)."""
  abstract = jax.eval_shape(lambda: experiment.init_state(cfg, model, tx, pretrained=None))
  if set(abstract.params) != {"model"}:
    raise ValueError(f"parameters besides the model's ({sorted(abstract.params)}): the config has "
                     "a trainable text tower or pair projection, which `variables` cannot fill")

  def check(what, new, old):
    if jax.tree.structure(new) != jax.tree.structure(old):
      raise ValueError(f"{what}: tree differs from the model's: {jax.tree.structure(new)} vs "
                       f"{jax.tree.structure(old)}")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(new)[0], jax.tree.leaves(old)):
      if np.shape(a) != b.shape:
        raise ValueError(f"{what}{jax.tree_util.keystr(path)}: shape {np.shape(a)}, the model "
                         f"has {b.shape}")
    return jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), new, old)
  params = {"model": check("params", variables["params"], abstract.params["model"])}
  stats = check("batch_stats", variables["batch_stats"], abstract.batch_stats)
  # The step draws no random numbers from rng; it is only carried along.
  return experiment.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(cfg.seed))


def measure(model_name: str, P: int, K: int, dtype: str, steps: int,
            num_classes: int = 395, built: tuple | None = None) -> dict:
  """Compiles the step (or takes `built`, what build() returns), runs one warm-up and `steps`
  timed steps; returns the figures."""
  cfg = _config(model_name)
  n = 3 * P * K
  compiled, state, batch, text, compile_s = built or build(model_name, P, K, dtype, num_classes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan")))
  mm = matmul_conv_flops(compiled.as_text())
  state, m = compiled(state, batch, text)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch, text)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  return dict(model=model_name, P=P, K=K, batch=n, size=f"{cfg.input.height}x{cfg.input.width}",
              dtype=dtype, compile_s=compile_s, step_s=med, images_s=n / med,
              xla_gflop=xla_flops / 1e9, mm_gflop=mm["total"] / 1e9,
              mm_gflop_image=mm["total"] / n / 1e9, gflops=mm["total"] / med / 1e9,
              peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


_COLUMNS = ("model", "input", "PxK (images)", "dtype", "compile (s)", "step (s)", "images/s",
            "XLA GFLOP/step", "mm+conv GFLOP/step", "mm+conv GFLOP/image", "GFLOP/s",
            "matmul GFLOP/s", "fraction")


def _row(r: dict, ref: float, peak_tflops: float | None) -> str:
  cells = [r["model"], r["size"], f"{r['P']}x{r['K']} ({r['batch']})", r["dtype"],
           f"{r['compile_s']:.1f}", f"{r['step_s']:.3g}", f"{r['images_s']:.1f}",
           f"{r['xla_gflop']:.0f}", f"{r['mm_gflop']:.0f}", f"{r['mm_gflop_image']:.3g}",
           f"{r['gflops']:.0f}", f"{ref:.0f}", f"{r['gflops'] / ref:.2f}"]
  if peak_tflops:
    cells.append(f"{r['gflops'] / (1e3 * peak_tflops):.3f}")
  cells.append(f"{r['peak_rss_gib']:.1f}")
  return "| " + " | ".join(cells) + " |"


def _parse_pk(text: str) -> list[tuple[int, int]]:
  out = []
  for item in text.split(","):
    m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
    if m is None:
      raise argparse.ArgumentTypeError(f"--sweep entries are PxK like 8x4, got {item!r}")
    out.append((int(m.group(1)), int(m.group(2))))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=("synthetic", "rn50"), default="synthetic")
  p.add_argument("--P", type=int, default=8)
  p.add_argument("--K", type=int, default=4)
  p.add_argument("--sweep", type=_parse_pk, default=None,
                 help="comma-separated PxK batch shapes measured in one run (e.g. 8x4,16x4,32x4); "
                      "overrides --P/--K and writes one table")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="device peak TFLOP/s for the dtype; adds an MFU column")
  p.add_argument("--compile_parallel", action="store_true",
                 help="compile every --sweep shape at once in threads before timing any (an "
                      "accelerator's compiles take about a minute each; the compile column then "
                      "shows each one's wall time under that sharing)")
  p.add_argument("--matmul_n", type=int, default=None,
                 help="side of the reference matmul (default 2048 on CPU, 8192 on accelerators)")
  args = p.parse_args()
  n = args.matmul_n or (2048 if jax.default_backend() == "cpu" else 8192)
  ref = matmul_gflops(n)
  shapes = args.sweep or [(args.P, args.K)]
  prebuilt = {}
  if args.compile_parallel and len(shapes) > 1:
    from concurrent.futures import ThreadPoolExecutor  # pylint: disable=g-import-not-at-top
    with ThreadPoolExecutor(max_workers=len(shapes)) as pool:
      futures = {pk: pool.submit(build, args.model, pk[0], pk[1], args.dtype) for pk in shapes}
      prebuilt = {pk: f.result() for pk, f in futures.items()}
  rows = []
  for P, K in shapes:
    rows.append(_row(measure(args.model, P, K, args.dtype, args.steps,
                             built=prebuilt.pop((P, K), None)), ref, args.peak_tflops))
    print(rows[-1], flush=True)
  cols = list(_COLUMNS) + (["MFU"] if args.peak_tflops else []) + ["peak RSS (GiB)"]
  flags = f"--model={args.model} --dtype={args.dtype} --steps={args.steps}"
  if args.sweep:
    flags += " --sweep=" + ",".join(f"{P}x{K}" for P, K in shapes)
    name, title = (f"train_step_{args.model}_{args.dtype}_sweep",
                   f"Train step batch scaling: {args.model}, {args.dtype}")
  else:
    flags += f" --P={args.P} --K={args.K}"
    name, title = (f"train_step_{args.model}_{args.P}x{args.K}_{args.dtype}",
                   f"Train step: {args.model}, P={args.P} K={args.K}, {args.dtype}")
  if jax.default_backend() != "cpu":  # Accelerator rows get their own sections beside the CPU ones.
    name += f"_{jax.default_backend()}"
  if args.compile_parallel:
    flags += " --compile_parallel"
  if args.peak_tflops:
    flags += f" --peak_tflops={args.peak_tflops:g}"
  if args.matmul_n:
    flags += f" --matmul_n={args.matmul_n}"
  write_section(name, "\n".join([
      f"## {title}", "",
      f"`python -m bench.train_step {flags}` on {machine_description()}. Median of {args.steps} "
      "steps after warm-up. XLA GFLOP: the compiled step's cost analysis (all ops); mm+conv: "
      "matrix products and convolutions only, counted from the optimised HLO (comparable with "
      "PyTorch model-FLOP counts); GFLOP/s uses mm+conv; matmul = a "
      f"{n}^2 float32 matmul in the same run, fraction = GFLOP/s / matmul"
      + ("; MFU = GFLOP/s / the given peak" if args.peak_tflops else "") + ". Peak RSS is the "
      "process maximum so far (a sweep reports the running maximum).", "",
      "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *rows]))


if __name__ == "__main__":
  main()
