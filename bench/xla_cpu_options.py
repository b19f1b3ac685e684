"""XLA:CPU options and ResNet rematerialisation on the RN50 step and embedding: what each one gives.

  python -m bench.xla_cpu_options                          # every variant, P=2 K=4 and batch 16
  python -m bench.xla_cpu_options --variants=jaxlib,project,eigen --rounds=1 --no_write

Each variant is a set of XLA_FLAGS (options the pinned jaxlib accepts; `python -m
bench.xla_cpu_options --list` prints them) or a `model.vision.remat` setting. Every run is a fresh
child process of bench.vs_torch (--child=jax: the project's model and trainer step on the weights
of the PyTorch peer) doing the embedding (the test-time feature with the mirrored copy) and then
the train step; variants take turns round after round, so a loaded machine slows them alike. Per
variant: median seconds of the timed calls, the process's peak resident memory after each task,
and how far its results are from the first variant's (max |difference| of the features; the first
step's loss and gradient norm): an option that changes results beyond float rounding cannot become
a default. The variants start from jaxlib's defaults, except `project` and `project_ynnpack`: the
project's own XLA:CPU options (eees_jax/xla_cpu.py), which came out of this table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

from bench import vs_torch
from bench._report import write_section
from eees_jax import xla_cpu

_YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot,-individual_convolution"
# name -> (XLA_FLAGS, remat stages or None for the config's default, what it is). All but
# "project" and "project_ynnpack" run without the project's XLA:CPU options (eees_jax/xla_cpu.py),
# from jaxlib's defaults.
VARIANTS = {
    "jaxlib": ("", None, "jaxlib's defaults: convolutions and matmuls in YNNPACK fusions"),
    "project": ("", None, "the project's default (eees_jax/xla_cpu.py; train step and test-time "
                          "feature): Eigen convolutions, memory-optimised schedule"),
    "project_ynnpack": ("", None, "the project's opt-out EEES_JAX_XLA_CPU_CONVOLUTIONS=ynnpack "
                                  "(train step and test-time feature): memory-optimised schedule"),
    "eigen": (_YNN_OFF, None, "no YNNPACK: convolutions and matmuls on XLA's Eigen runtime"),
    "eigen_conv": ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", None,
                   "Eigen convolutions, YNNPACK matmuls"),
    "ynn_conv_eigen_dot": ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot", None,
                           "YNNPACK convolutions, Eigen matmuls"),
    "onednn_dot": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
                   None, "oneDNN matmul fusions (convolutions stay in YNNPACK)"),
    "ynn_eltwise_reduce": ("--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce", None,
                           "YNNPACK also for elementwise and reduce fusions"),
    "xnn_graph": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
                  None, "XNNPACK graph fusion (greedy)"),
    "vector512": ("--xla_cpu_prefer_vector_width=512", None,
                  "LLVM code with 512-bit vectors (AVX-512) instead of 256"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", None, "unsafe fast math"),
    "sched_memory": ("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", None,
                     "memory-optimised HLO schedule"),
    "sched_concurrency": ("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
                          None, "concurrency-optimised HLO schedule"),
    "fast_runtime": ("--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME", None,
                     "optimisation preset FAST_RUNTIME"),
    "remat_all": ("", ["stem", "layer1", "layer2", "layer3", "layer4"],
                  "model.vision.remat: every stage recomputed in the backward pass"),
    "remat_stem_layer1": ("", ["stem", "layer1"],
                          "model.vision.remat: the two highest-resolution stages recomputed"),
}


# Timed by default: the variants whose program differs from jaxlib's default one, or whose machine
# code may (LLVM code-generation flags). xnn_graph, sched_concurrency and fast_runtime compile the
# RN50 step and embedding to the default optimised HLO with this jaxlib ("HLO as first" column).
TIMED = tuple(v for v in VARIANTS if v not in ("xnn_graph", "sched_concurrency", "fast_runtime"))


def run(args) -> tuple[list[dict], dict]:
  """Every variant --rounds times, interleaved. Returns (rows, extra) for the report."""
  tasks = ",".join(([f"embed{args.embed_batch}"] if args.embed_batch else [])
                   + [f"step{args.P}x{args.K}"])
  names = args.variants
  times = {n: {} for n in names}
  peaks = {n: {} for n in names}
  compile_s = {n: [] for n in names}
  diffs = {n: {} for n in names}
  failed: dict[str, str] = {}
  hlo = {n: {} for n in names}
  base_flags = os.environ.get("XLA_FLAGS", "")
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      for name in (names if r % 2 == 0 else list(reversed(names))):
        if name in failed:
          continue
        flags, remat, _ = VARIANTS[name]
        save = os.path.join(tmp, f"{name}_{r}")
        env = {"XLA_FLAGS": " ".join(filter(None, (base_flags, flags))),
               xla_cpu.ENV_SWITCH: "1" if name.startswith("project") else "0",
               xla_cpu.ENV_CONVOLUTIONS: "ynnpack" if name == "project_ynnpack" else "eigen"}
        try:
          results = vs_torch.spawn("jax", tasks, args.dtype, args, env=env,
                                   remat=remat if remat is not None else args.remat, save=save)
        except RuntimeError as e:  # a variant the jaxlib cannot run is a result too
          failed[name] = str(e).strip().splitlines()[-1][:200]
          print(f"round {r + 1} {name}: failed: {failed[name]}", flush=True)
          continue
        for res in results:
          times[name].setdefault(res["task"], []).extend(res["seconds"])
          peaks[name][res["task"]] = max(peaks[name].get(res["task"], 0.0), res["peak_gib"])
          if res["compile_s"]:
            compile_s[name].append(res["compile_s"])
          hlo[name][res["task"]] = res.get("hlo_sha1")
        print(f"round {r + 1} {name}: " + ", ".join(
            f"{res['task']} {statistics.median(res['seconds']):.3g} s" for res in results),
              flush=True)
      if r == 0:  # results are deterministic per variant: compare the first round's
        if names[0] in failed:
          raise SystemExit(f"the reference variant {names[0]} failed: {failed[names[0]]}")
        for name in names:
          if name in failed:
            continue
          for task in tasks.split(","):
            ref = np.load(os.path.join(tmp, f"{names[0]}_0_{task}.npy")).astype(np.float64)
            got = np.load(os.path.join(tmp, f"{name}_0_{task}.npy")).astype(np.float64)
            if task.startswith("step"):  # first loss |diff|, first gradient norm relative diff
              diffs[name][task] = (f"{abs(got[0] - ref[0]):.2g} / "
                                   f"{abs(got[1] - ref[1]) / abs(ref[1]):.2g}")
            else:
              diffs[name][task] = f"{np.abs(got - ref).max():.2g}"
  rows = []
  for name in names:
    row = {"name": name, "flags": VARIANTS[name][0] or "-", "remat": VARIANTS[name][1],
           "what": VARIANTS[name][2], "compile_s": statistics.median(compile_s[name] or [0.0]),
           "failed": failed.get(name),
           "same_hlo": all(hlo[name].get(t) == hlo[names[0]].get(t) for t in tasks.split(","))
           if name not in failed else False}
    if name in failed:
      rows.append(row)
      continue
    for task in tasks.split(","):
      n = args.embed_batch if task.startswith("embed") else 3 * args.P * args.K
      row[task] = {"s": statistics.median(times[name][task]), "images": n,
                   "peak": peaks[name][task], "diff": diffs[name][task]}
    rows.append(row)
  return rows, {"tasks": tasks.split(",")}


def report(args, rows: list[dict], tasks: list[str], load: tuple, command: str) -> str:
  head = ["variant", "what", "HLO as first"]
  for t in tasks:
    label = (f"embedding b{args.embed_batch}" if t.startswith("embed")
             else f"step {args.P}x{args.K}")
    head += [f"{label} images/s", "vs first", f"{label} peak GiB",
             f"{label} {'features max diff' if t.startswith('embed') else 'loss diff / grad-norm rel diff'}"]
  lines = [
      f"## XLA:CPU options and rematerialisation: RN50 step and embedding ({args.dtype})", "",
      f"Command: `{command}`  ",
      f"Machine: {vs_torch.machine_line()}  ",
      f"Load average (1, 5, 15 min) before: {vs_torch._load(load[0])}; after: "  # pylint: disable=protected-access
      f"{vs_torch._load(load[1])} ({os.cpu_count()} cores, shared with other jobs when above 0)", "",
      f"Input {args.height}x{args.width}; the train step at P={args.P} K={args.K} "
      f"({3 * args.P * args.K} images, identity + triplet, Adam) and the embedding of "
      f"{args.embed_batch} images with the mirrored copy, in a fresh process per variant and "
      f"round ({args.rounds} rounds, variants interleaved; {args.child_calls} timed call(s) after a "
      "warm-up per task and process): median images/s, ratio to the first variant, peak resident "
      "memory of the process after the task (VmHWM), and the difference from the first variant's "
      "results: largest |difference| of the features (embedding); |difference| of the first "
      "step's loss and relative difference of its gradient norm (step: the same function gives "
      "float rounding, ~1e-6). 'HLO as first': whether the optimised HLO of both tasks is the "
      "first variant's (the same program; flags acting on LLVM code generation change the machine "
      "code under the same HLO).", ""]
  if not rows:
    return "\n".join(lines[:5])
  base = rows[0]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [f"`{r['name']}`", r["what"], "same" if r["same_hlo"] else "differs"]
    if r["failed"]:
      cells += [f"failed: {r['failed']}"] + ["-"] * (4 * len(tasks) - 1)
      lines.append("| " + " | ".join(cells) + " |")
      continue
    for t in tasks:
      ips = r[t]["images"] / r[t]["s"]
      cells += [f"{ips:.3g}", f"{ips / (base[t]['images'] / base[t]['s']):.2f}",
                f"{r[t]['peak']:.2f}", r[t]["diff"]]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Flags of each variant:", ""]
  for r in rows:
    remat = f"; remat {','.join(r['remat'])}" if r["remat"] is not None else ""
    lines.append(f"- `{r['name']}`: `{r['flags']}`{remat}")
  return "\n".join(lines)


KERNEL_BACKENDS = ("jaxlib", "eigen", "onednn_dot", "pytorch")  # pytorch: the same kernels in torch


def kernel_child() -> None:
  """Prints JSON GFLOP/s of a 2048^2 matmul and of a 3x3 convolution (64 -> 64 channels, 24 x 72 x
  36, RN50 layer1's at 288x144), forward and forward + backward, in float32 and bfloat16; each
  kernel's dtypes alternate, best of 7 runs."""
  import json  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  rng = np.random.default_rng(0)
  b, h, w, c, n = 24, 72, 36, 64, 2048
  conv_flop = 2.0 * b * h * w * c * c * 9
  kernels = {
      "matmul": (jax.jit(lambda a: a @ a), lambda: (rng.standard_normal((n, n)),), 2.0 * n ** 3),
      "conv fwd": (jax.jit(conv), lambda: (rng.standard_normal((b, h, w, c)),
                                          0.05 * rng.standard_normal((3, 3, c, c))), conv_flop),
      "conv fwd+bwd": (jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k).astype(jnp.float32) ** 2),
                                        argnums=(0, 1))),
                       lambda: (rng.standard_normal((b, h, w, c)),
                                0.05 * rng.standard_normal((3, 3, c, c))), 3 * conv_flop)}
  if os.environ.get("KERNEL_CHILD_TORCH"):  # the same kernels in PyTorch (oneDNN) for reference
    kernels = _torch_kernels(b, h, w, c, n, conv_flop)
  out = {}
  for name, (fn, make, flop) in kernels.items():
    if os.environ.get("KERNEL_CHILD_TORCH"):
      import torch  # pylint: disable=g-import-not-at-top
      args = {dt: [torch.tensor(a, dtype=getattr(torch, dt)) for a in make()]
              for dt in ("float32", "bfloat16")}
      wait = lambda x: x
    else:
      args = {dt: [jnp.asarray(a, dt) for a in make()] for dt in ("float32", "bfloat16")}
      wait = jax.block_until_ready
    best = {dt: float("inf") for dt in args}
    for dt in args:
      wait(fn(*args[dt]))
    for _ in range(7):
      for dt in args:
        t = time.perf_counter()
        wait(fn(*args[dt]))
        best[dt] = min(best[dt], time.perf_counter() - t)
    out[name] = {dt: flop / best[dt] / 1e9 for dt in best}
    if not os.environ.get("KERNEL_CHILD_TORCH"):  # what the compiled bfloat16 program computes in
      out[name]["compiled"] = _kernel_dtypes(fn.lower(*args["bfloat16"]).compile().as_text())
  print(json.dumps(out))


def _kernel_dtypes(hlo: str) -> str:
  """Result element types of the dots and convolutions of an optimised HLO module ('f32', ...)."""
  import re  # pylint: disable=g-import-not-at-top
  found = sorted(set(re.findall(r"= (\w+)\[[\d,]*\](?:\{[^}]*\})? (?:dot|convolution)\(", hlo)))
  return "+".join(found) or "?"


def _torch_kernels(b, h, w, c, n, conv_flop):
  """kernel_child's kernels in PyTorch (NHWC data as channels-last NCHW tensors)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def conv(x, k):
    return F.conv2d(x.permute(0, 3, 1, 2), k.permute(3, 2, 0, 1), padding=1)

  def conv_grad(x, k):
    x, k = x.detach().requires_grad_(), k.detach().requires_grad_()
    return torch.autograd.grad(conv(x, k).float().square().sum(), (x, k))

  def no_grad(fn):
    def run(*a):
      with torch.no_grad():
        return fn(*a)
    return run
  rng = np.random.default_rng(0)
  return {
      "matmul": (no_grad(lambda a: a @ a), lambda: (rng.standard_normal((n, n)),), 2.0 * n ** 3),
      "conv fwd": (no_grad(conv), lambda: (rng.standard_normal((b, h, w, c)),
                                          0.05 * rng.standard_normal((3, 3, c, c))), conv_flop),
      "conv fwd+bwd": (conv_grad, lambda: (rng.standard_normal((b, h, w, c)),
                                           0.05 * rng.standard_normal((3, 3, c, c))),
                       3 * conv_flop)}


def kernel_table(rounds: int) -> str:
  """float32 and bfloat16 GFLOP/s of each kernel on each backend (child processes, best over
  rounds); a bfloat16 / float32 ratio near 2 or more means native bfloat16 arithmetic."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  best: dict = {}
  for _ in range(rounds):
    for name in KERNEL_BACKENDS:
      if name == "pytorch":
        env = dict(os.environ, KERNEL_CHILD_TORCH="1")
      else:
        env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, (os.environ.get("XLA_FLAGS", ""),
                                                                VARIANTS[name][0]))))
        env[xla_cpu.ENV_SWITCH] = "0"
      proc = subprocess.run([sys.executable, "-m", "bench.xla_cpu_options", "--kernel_child"],
                            capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      if proc.returncode:
        best[name] = proc.stderr.strip().splitlines()[-1][:120] if proc.stderr.strip() else "failed"
        continue
      for kernel, by_dtype in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        slot = best.setdefault(name, {}).setdefault(kernel, {})
        slot["compiled"] = by_dtype.pop("compiled", "-")
        for dt, g in by_dtype.items():
          slot[dt] = max(slot.get(dt, 0.0), g)
  lines = ["| backend | kernel | float32 GFLOP/s | bfloat16 GFLOP/s | bfloat16 / float32 | "
           "bfloat16 program's dot / convolution computes in |", "|---|---|---|---|---|---|"]
  for name in KERNEL_BACKENDS:
    if isinstance(best.get(name), str):
      lines.append(f"| `{name}` | all | failed: {best[name]} | - | - | - |")
      continue
    for kernel, g in best[name].items():
      lines.append(f"| `{name}` | {kernel} | {g['float32']:.0f} | {g['bfloat16']:.0f} | "
                   f"{g['bfloat16'] / g['float32']:.2f} | {g['compiled']} |")
  return "\n".join(lines)


def list_flags() -> None:
  """Prints the XLA:CPU flags this jaxlib accepts, with their help (from XLA's own flag list)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_opt_preset=not-a-preset")
  proc = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                        capture_output=True, text=True, env=env)
  text = proc.stderr + proc.stdout
  keep, out = False, []
  for line in text.splitlines():
    if line.lstrip().startswith("--"):
      keep = line.lstrip().startswith("--xla_cpu")
    if keep:
      out.append(line.rstrip())
  print("\n".join(out) if out else text[-3000:])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", type=vs_torch._parse_list, default=list(TIMED),  # pylint: disable=protected-access
                 help="comma-separated, from: " + ", ".join(VARIANTS) + " (the first is the "
                      "reference)")
  p.add_argument("--model", choices=sorted(vs_torch.MODELS), default="rn50")
  p.add_argument("--height", type=int, default=288)
  p.add_argument("--width", type=int, default=144)
  p.add_argument("--P", type=int, default=2)
  p.add_argument("--K", type=int, default=4)
  p.add_argument("--embed_batch", type=int, default=16, help="0 skips the embedding")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--child_calls", type=int, default=1, help="timed calls per task and process")
  p.add_argument("--remat", type=vs_torch._parse_list, default=None,  # pylint: disable=protected-access
                 help="remat stages for the variants that do not set their own")
  p.add_argument("--list", action="store_true", help="print the XLA:CPU flags of this jaxlib")
  p.add_argument("--kernels", action="store_true",
                 help="also time matmul and 3x3 convolution kernels in float32 and bfloat16 on "
                      "each backend (" + ", ".join(KERNEL_BACKENDS) + ")")
  p.add_argument("--kernel_child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--no_write", action="store_true")
  p.add_argument("--section", default=None)
  args = p.parse_args(argv)
  if args.list:
    list_flags()
    return
  if args.kernel_child:
    kernel_child()
    return
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
  load_before = os.getloadavg()
  command = "python -m bench.xla_cpu_options " + " ".join(sys.argv[1:] if argv is None else argv)
  rows, extra = run(args) if args.variants else ([], {"tasks": []})
  md = report(args, rows, extra["tasks"], (load_before, os.getloadavg()), command)
  if args.kernels:
    md += ("\n\nKernels (which paths have native bfloat16: a ratio near 2 or more), best of 7 runs "
           f"x {args.rounds} processes per backend:\n\n" + kernel_table(args.rounds))
  print(md)
  if not args.no_write:
    write_section(args.section or f"xla_cpu_options_{args.dtype}", md)


if __name__ == "__main__":
  main()
