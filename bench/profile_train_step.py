"""Where the train step's time goes: per-op device time from a profiler trace, grouped by kind.

  python -m bench.profile_train_step --model=rn50 --P=2 --K=4

Compiles the trainer's step (bench.train_step.build), runs it twice, traces a third run with
jax.profiler and sums each executed HLO op's time (both threads of the CPU runtime, so the total can
exceed the wall time). Ops are classified from the optimised HLO: convolution by window (a window
the size of the feature map is a kernel gradient), dot, reduce, reduce-window (pooling),
transpose/copy, other elementwise; and by the model region in their op_name (stem, layer1..4,
attnpool; forward or backward), the rest going to heads/loss/optimizer. Writes the
`rn50_profile` (or `<model>_profile`) section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile
import time

import jax

from bench._report import machine_description, write_section
from bench.train_step import build


def _instructions(hlo: str) -> tuple[dict[str, str], dict[str, str]]:
  """Optimised HLO text -> ({instruction name: its text}, {computation name: its body})."""
  instr, comps, cur, body = {}, {}, None, []
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      cur, body = head.group(1), []
      comps[cur] = body
      continue
    if cur is not None:
      body.append(line)
    m = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$", line)
    if m:
      instr[m.group(1)] = m.group(2)
  return instr, {k: "\n".join(v) for k, v in comps.items()}


def classify(name: str, instr: dict[str, str], comps: dict[str, str]) -> tuple[str, str, str]:
  """(kind, region, direction) of one executed op."""
  text = instr.get(name, "")
  op_name = re.search(r'op_name="([^"]*)"', text)
  op_name = op_name.group(1) if op_name else ""
  called = re.search(r"calls=%([\w.\-]+)", text)
  body = comps.get(called.group(1), "") + text if called else text
  if "convolution(" in body:
    window = re.search(r"window=\{size=(\w+)", body)
    kind = f"conv {window.group(1) if window else '?'}"
    if "feature_group_count" in body:
      kind += " grouped"
  elif " dot(" in body:
    kind = "dot"
  elif "reduce-window" in body:
    kind = "reduce-window (pool)"
  elif " reduce(" in body:
    kind = "reduce"
  elif "transpose" in name or "copy" in name:
    kind = "transpose/copy"
  else:
    kind = "elementwise/other"
  region = re.search(r"encoder/(?:vmap\()?(stem|layer\d|attnpool)", op_name)
  region = region.group(1) if region else ("heads/loss/optimizer" if op_name else "no op_name")
  backward = "transpose(" in op_name
  window = re.fullmatch(r"conv (\d+)x(\d+).*", kind)
  if window and int(window.group(1)) > 7:  # window = feature map: a 3x3 kernel's gradient
    kind, backward = f"conv kernel-grad (map {window.group(1)}x{window.group(2)})", True
  elif not op_name and kind == "transpose/copy":  # layout changes feeding the kernel gradients
    backward = True
  return kind, region, "backward" if backward else "forward"


def profile(model: str, P: int, K: int, dtype: str) -> dict:
  compiled, state, batch, text, _ = build(model, P, K, dtype)
  for _ in range(2):
    state, m = compiled(state, batch, text)
    jax.block_until_ready(m)
  t = time.perf_counter()
  state, m = compiled(state, batch, text)
  jax.block_until_ready(m)
  wall = time.perf_counter() - t
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    state, m = compiled(state, batch, text)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
    path = next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                if f.endswith(".xplane.pb"))
    data = jax.profiler.ProfileData.from_file(path)
  instr, comps = _instructions(compiled.as_text())
  ops = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        # Op events carry HLO instruction names; runtime bookkeeping events are skipped.
        if ev.name in instr:
          ops[ev.name] += ev.duration_ns
  by = {key: collections.Counter() for key in ("kind", "region", "detail")}
  for name, ns in ops.items():
    kind, region, direction = classify(name, instr, comps)
    by["kind"][(kind, direction)] += ns
    by["region"][region] += ns
    by["detail"][(region, kind, direction)] += ns
  return dict(wall=wall, total=sum(ops.values()), n=3 * P * K, **by)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=("synthetic", "rn50"), default="rn50")
  p.add_argument("--P", type=int, default=2)
  p.add_argument("--K", type=int, default=4)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--top", type=int, default=25, help="rows of the region x kind table")
  args = p.parse_args()
  r = profile(args.model, args.P, args.K, args.dtype)
  tot = r["total"]

  def table(title, counter, limit=None):
    rows = [f"| {' / '.join(k) if isinstance(k, tuple) else k} | {v / 1e9:.3f} | "
            f"{100 * v / tot:.1f} |" for k, v in counter.most_common(limit)]
    return [f"| {title} | op time (s) | share (%) |", "|---|---|---|", *rows, ""]

  cmd = (f"python -m bench.profile_train_step --model={args.model} --P={args.P} --K={args.K} "
         f"--dtype={args.dtype}")
  lines = [f"## Train-step profile: {args.model}, P={args.P} K={args.K} ({r['n']} images), "
           f"{args.dtype}", "",
           f"`{cmd}` on {machine_description()}, load average {os.getloadavg()[0]:.1f} at the end. "
           f"Step wall time {r['wall']:.2f} s ({r['n'] / r['wall']:.1f} images/s); summed op time "
           f"{tot / 1e9:.2f} s over the runtime's threads. 'dot' holds the 1x1 convolutions "
           "(computed as matmuls), the attention pool's and the heads' products; a "
           "kernel-grad convolution (window = feature map) is a 3x3 kernel's gradient (XLA "
           "drops op_name on those and on their transposes); transposes feeding the "
           "kernel-gradient products carry fused batch-norm backward work.", ""]
  lines += table("kind / direction", r["kind"])
  lines += table("region", r["region"])
  lines += table("region / kind / direction", r["detail"], args.top)
  print("\n".join(lines))
  write_section("rn50_profile" if args.model == "rn50" else f"train_step_profile_{args.model}",
                "\n".join(lines))


if __name__ == "__main__":
  main()
