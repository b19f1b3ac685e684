"""glibc's allocator settings on the synthetic CLIP's pretraining: what the Makefile's GLIBC_TUNABLES gives.

  python -m bench.malloc_tunables                       # 3 rounds of 200 steps, writes BENCHMARKS.md
  python -m bench.malloc_tunables --rounds=1 --steps=50 --no_write

Every run is a fresh `python -m eees_jax.pretrain_clip --config=configs/synthetic.py` child with
`--config.pretrain.steps` set, under glibc's defaults or under the Makefile's value (the only
difference is the environment variable; the variants take turns, round after round, so a loaded
machine slows both alike). Per variant: median wall seconds of the child, its user and system CPU
seconds, minor page faults and peak resident memory (the child's own rusage), and
its final contrastive loss, which must be the same in both (the allocator moves no arithmetic).
The pretraining set is generated into the config's data root before the first run if it is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from bench._report import machine_description, write_section

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def makefile_tunables(path: str = os.path.join(REPO, "Makefile")) -> str:
  """The GLIBC_TUNABLES value the Makefile exports to `make demo` and `make test`."""
  with open(path) as f:
    match = re.search(r"^GLIBC_TUNABLES \?= (\S+)$", f.read(), re.M)
  if not match:
    raise SystemExit(f"{os.path.relpath(path, REPO)} sets no GLIBC_TUNABLES")
  return match.group(1)


def run_child(steps: int, tunables: str | None, out: str) -> dict:
  """One pretraining child; its wall time, rusage and final loss."""
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  start = time.perf_counter()
  with open(out + ".stdout", "w+") as stdout, open(out + ".stderr", "w+") as stderr:
    proc = subprocess.Popen([sys.executable, "-m", "eees_jax.pretrain_clip",
                             "--config=configs/synthetic.py", f"--config.pretrain.steps={steps}",
                             f"--out={out}"], cwd=REPO, env=env, stdout=stdout, stderr=stderr)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, its peak memory too
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    stdout.seek(0)
    stderr.seek(0)
    if proc.returncode:
      raise SystemExit(f"pretraining child failed ({proc.returncode}):\n{stderr.read()[-2000:]}")
    text = stdout.read()
  result = json.loads(text[text.rfind("{\n"):])  # the JSON the module prints last
  return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "faults": usage.ru_minflt,
          "peak_gib": usage.ru_maxrss / 2**20, "loss": result["final_loss"]}


def ensure_pretraining_set() -> None:
  """Generates configs/synthetic.py's pretraining set if it is missing, as the trainer would."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from data_pipelines import datasets  # pylint: disable=g-import-not-at-top
  p = synthetic.get_config().pretrain
  os.chdir(REPO)  # the config's roots are relative to the repository
  datasets.ensure_synthetic(ml_collections.ConfigDict(dict(root=p.data.root,
                                                           generate=p.data.generate)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--no_write", action="store_true", help="print, do not touch BENCHMARKS.md")
  args = parser.parse_args()
  tunables = makefile_tunables()
  variants = {"glibc defaults": None, "Makefile's GLIBC_TUNABLES": tunables}
  runs: dict[str, list[dict]] = {name: [] for name in variants}
  ensure_pretraining_set()  # generated once, outside the timed runs
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      order = list(variants) if r % 2 == 0 else list(reversed(variants))
      for name in order:
        res = run_child(args.steps, variants[name],
                        os.path.join(tmp, f"clip_{r}_{list(variants).index(name)}"))
        runs[name].append(res)
        print(f"round {r + 1} {name}: {res['wall']:.1f} s wall, sys {res['sys']:.1f} s, "
              f"{res['faults']} minor faults, final loss {res['loss']!r}", flush=True)
  losses = {res["loss"] for rs in runs.values() for res in rs}
  lines = [
      f"## glibc malloc tunables: the synthetic CLIP's pretraining, {args.steps} steps", "",
      f"Command: `python -m bench.malloc_tunables --steps={args.steps} --rounds={args.rounds}`  ",
      f"Machine: {machine_description()}; load average before {load_before[0]:.2f}", "",
      f"Each run is a fresh `python -m eees_jax.pretrain_clip --config=configs/synthetic.py "
      f"--config.pretrain.steps={args.steps}` (data loading and compilation included, about 28 s "
      "of each), the two variants taking turns; medians over the rounds (range). The Makefile's "
      f"value: `{tunables}`.", "",
      "| variant | wall s | user CPU s | system CPU s | minor page faults | peak GiB | final loss |",
      "|---|---|---|---|---|---|---|"]
  for name, rs in runs.items():
    col = lambda k, fmt: (f"{fmt.format(statistics.median(x[k] for x in rs))} "
                          f"({fmt.format(min(x[k] for x in rs))}-{fmt.format(max(x[k] for x in rs))})")
    lines.append(f"| {name} | {col('wall', '{:.1f}')} | {col('user', '{:.1f}')} | "
                 f"{col('sys', '{:.1f}')} | {col('faults', '{:,.0f}')} | {col('peak_gib', '{:.2f}')} | "
                 f"{rs[0]['loss']:.6f} |")
  lines += ["", "Final losses: " + ("identical in every run." if len(losses) == 1 else
                                    f"DIFFER between runs: {sorted(losses)}")]
  text = "\n".join(lines)
  print(text)
  if len(losses) != 1:
    raise SystemExit("the allocator changed the result: not a speed-only setting")
  if not args.no_write:
    write_section("malloc_tunables", text)


if __name__ == "__main__":
  main()
