"""The ablation table (SPEC section 3): every row x seed is one `eees_jax.main` run.

  python -m eees_jax.ablation --config=configs/synthetic.py --workdir=workdir/ablation --seeds=0,1,2

Rows are configs.common.ABLATION_ROWS (baseline = identity + triplet; +ESE; +ESE+CVSC; +ESE+CMSP;
full EEES). Each run is a separate process with its own workdir (<workdir>/<row>/seed<s>), so an
interrupted table resumes: finished runs are read back from their report, unfinished ones resume
from their last checkpoint. `--set a.b=v` adds overrides to every run; `--holdout` trains on the
train ids and scores the val ids, which is how the synthetic config was tuned.
The table (mean, standard deviation and range over seeds) goes to <workdir>/ablation.md/.json.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent import futures
from typing import Sequence

from absl import app, flags

from configs.common import ABLATION_ROWS
from eees_jax.evaluation import protocols

_CONFIG = flags.DEFINE_string("config", "configs/synthetic.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-folder per row and seed.")
_ROWS = flags.DEFINE_list("rows", list(ABLATION_ROWS), "Rows of configs.common.ABLATION_ROWS.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) of every row.")
_SET = flags.DEFINE_multi_string("set", [], "Extra override a.b=v for every run (repeatable).")
_HOLDOUT = flags.DEFINE_bool("holdout", False, "Score held-out val ids (tuning), not the test ids.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (one accelerator can hold several).")
flags.mark_flags_as_required(["workdir"])

SETTINGS = tuple(protocols.sysu_setting_name(mode, 1) for mode in ("all", "indoor"))
METRICS = ("rank1", "mAP")


def run_command(config: str, workdir: str, row: str, seed: int, extra: Sequence[str],
                holdout: bool) -> list[str]:
  """The `eees_jax.main` command line of one run."""
  if row not in ABLATION_ROWS:
    raise app.UsageError(f"--rows: {row!r} is not one of {list(ABLATION_ROWS)}")
  cmd = [sys.executable, "-m", "eees_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.seed={seed}"]
  cmd += [f"--config.{k}={v}" for k, v in ABLATION_ROWS[row].items()]
  if holdout:
    cmd.append("--config.dataset.holdout=True")
  cmd += [f"--config.{kv}" for kv in extra]
  return cmd


def summarise(results: dict[str, dict[int, dict]]) -> dict:
  """{row: {setting: {metric: {mean, std, min, max, n}}}} over seeds; std is the sample std."""
  table = {}
  for row, by_seed in results.items():
    table[row] = {}
    for setting in SETTINGS:
      values = {m: [r["settings"][setting]["mean"][m] for r in by_seed.values()
                    if setting in r["settings"]] for m in METRICS}
      table[row][setting] = {
          m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
              "min": min(v), "max": max(v), "n": len(v)} for m, v in values.items() if v}
  return table


def markdown(table: dict, title: str) -> str:
  lines = [f"## {title}", "",
           "| Row | " + " | ".join(f"{s.split('-')[0]} {m}" for s in SETTINGS for m in ("Rank-1", "mAP"))
           + " |", "|---|" + "---|" * (2 * len(SETTINGS))]
  for row, settings in table.items():
    cells = []
    for s in SETTINGS:
      for m in METRICS:
        c = settings.get(s, {}).get(m)
        cells.append("-" if c is None else
                     f"{c['mean']:.2f} ± {c['std']:.2f} ({c['min']:.2f}-{c['max']:.2f})")
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  n = {c["n"] for st in table.values() for ms in st.values() for c in ms.values()}
  lines += ["", f"Mean ± sample standard deviation (range) over {'/'.join(map(str, sorted(n)))} "
            "seeds, in percent."]
  return "\n".join(lines) + "\n"


def _run_one(cmd: list[str], workdir: str, env: dict) -> dict:
  report = os.path.join(workdir, "report", "results.json")
  if not os.path.isfile(report):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "run.log"), "a") as log:
      proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
      raise RuntimeError(f"run failed (exit {proc.returncode}); see {os.path.join(workdir, 'run.log')}: "
                         + " ".join(cmd))
    if not os.path.isfile(report):  # A preempted run (SIGTERM) saves a checkpoint and exits 0.
      raise RuntimeError(f"run stopped before its report ({report}); run the same ablation command "
                         "again to resume it from its checkpoint")
  with open(report) as f:
    return json.load(f)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  root = _WORKDIR.value
  seeds = [int(s) for s in _SEEDS.value]
  env = dict(os.environ)
  if _PARALLEL.value > 1:
    # Several processes share one accelerator: none may pre-allocate most of its memory.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  jobs = {(row, seed): os.path.join(root, row, f"seed{seed}") for row in _ROWS.value for seed in seeds}
  cmds = {key: run_command(_CONFIG.value, wd, key[0], key[1], _SET.value, _HOLDOUT.value)
          for key, wd in jobs.items()}
  start = time.time()
  results: dict[str, dict[int, dict]] = {row: {} for row in _ROWS.value}
  with futures.ThreadPoolExecutor(max(_PARALLEL.value, 1)) as pool:
    todo = {pool.submit(_run_one, cmds[k], jobs[k], env): k for k in jobs}
    for i, done in enumerate(futures.as_completed(todo), 1):
      row, seed = todo[done]
      results[row][seed] = done.result()
      head = results[row][seed]["settings"][SETTINGS[0]]["mean"]
      print(f"[{i}/{len(jobs)}] {row} seed {seed}: Rank-1 {head['rank1']:.2f} "
            f"mAP {head['mAP']:.2f} ({time.time() - start:.0f} s)", flush=True)
  table = summarise(results)
  what = "held-out val ids (tuning, not a test result)" if _HOLDOUT.value else "test ids"
  title = f"Ablation on {_CONFIG.value}, {what}" + (f", {' '.join(_SET.value)}" if _SET.value else "")
  md = markdown(table, title)
  with open(os.path.join(root, "ablation.md"), "w") as f:
    f.write(md)
  with open(os.path.join(root, "ablation.json"), "w") as f:
    json.dump({"config": _CONFIG.value, "overrides": _SET.value, "holdout": _HOLDOUT.value,
               "seeds": seeds, "commands": {f"{r}/seed{s}": c[1:] for (r, s), c in cmds.items()},
               "table": table}, f, indent=1)
  print(md)


if __name__ == "__main__":
  app.run(main)
