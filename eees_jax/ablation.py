"""The ablation table (SPEC section 3): every row x seed (x RegDB split) is one `eees_jax.main` run.

  python -m eees_jax.ablation --config=configs/synthetic.py --workdir=workdir/ablation --seeds=0,1,2
  python -m eees_jax.ablation --config=configs/regdb.py --workdir=workdir/regdb --rows=full \
      --seeds=0 --splits=1-10 --set=dataset.root=data/RegDB    # RegDB: the mean over its 10 splits

Rows are configs.common.ABLATION_ROWS (baseline = identity + triplet; +ESE; +ESE+CVSC; +ESE+CMSP;
full EEES). Each run is a separate process with its own workdir (<workdir>/<row>/seed<s>, and
/split<k> with --splits), so an interrupted table resumes: finished runs are read back from their
report, unfinished ones resume from their last checkpoint.

Each run's folder records the command and the resolved config it was started with
(ablation_run.json). A table whose config differs from a recorded run (another --set, --holdout,
row, or an edited config file) refuses to start and names the differing keys and the folder: use
another --workdir, or delete that folder to rerun it. Every run's config is validated before the
first one starts.

`--set a.b=v` adds overrides to every run; `--holdout` trains on the train ids and scores the val
ids, which is how the synthetic config was tuned. `--splits` (data sets with per-split models,
RegDB) trains or reuses one run per split and reports each row and seed as the mean over the
splits (also written as <workdir>/<row>/seed<s>/report/results.md, with every split's numbers).
The table (mean, standard deviation and range over seeds, for the data set's settings as
data_pipelines.registry names them) goes to <workdir>/ablation.md/.json. Runs with
config.eval.text_retrieval (`--set=eval.text_retrieval=True`) add a second table of their
text-to-person rows (eees_jax.evaluation.text_retrieval), with what ties each row's joint feature to
text: baseline against +ESE is what ESE adds to searching people by sentence.

Preemption: a run that exits with eees_jax.train.PREEMPTED_EXIT_CODE (it saved after a SIGTERM) is
resumed by launching the same command again. A SIGTERM to the ablation itself is passed on to the
running runs (each saves); the ablation then exits with the same code, and rerunning the same
ablation command resumes every unfinished run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from configs.common import ABLATION_ROWS
from data_pipelines import registry
from eees_jax import config_validation
from eees_jax.evaluation import protocols, report, text_retrieval
from eees_jax.train import PREEMPTED_EXIT_CODE

_CONFIG = flags.DEFINE_string("config", "configs/synthetic.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-folder per row and seed (and split).")
_ROWS = flags.DEFINE_list("rows", list(ABLATION_ROWS), "Rows of configs.common.ABLATION_ROWS.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) of every row.")
_SET = flags.DEFINE_multi_string("set", [], "Extra override a.b=v for every run (repeatable).")
_HOLDOUT = flags.DEFINE_bool("holdout", False, "Score held-out val ids (tuning), not the test ids.")
_SPLITS = flags.DEFINE_list("splits", [], "Per-split data sets (RegDB): the splits to train and "
                            "average, e.g. 1-10 or 1,2,3; default: the config's dataset.split only.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (one accelerator can hold several).")

METRICS = ("rank1", "mAP")
RECORD = "ablation_run.json"


class StaleRunError(RuntimeError):
  """A run folder holds a run of another config than the one this table asks for."""


class RunFailedError(RuntimeError):
  """A run exited with an error or without its report."""


class AblationPreempted(RuntimeError):
  """The ablation was asked to stop (SIGTERM); its runs saved, the same command resumes them."""


# Resuming a run that keeps exiting as preempted (someone else sending SIGTERMs) gives up after this.
MAX_RESUMES = 20
_STOP = threading.Event()     # set by the ablation's own SIGTERM handler
_RUNNING: set = set()         # the launched run processes, to pass a SIGTERM on
_RUNNING_LOCK = threading.Lock()


def _on_sigterm(signum, frame) -> None:
  _STOP.set()
  with _RUNNING_LOCK:
    for proc in _RUNNING:
      proc.send_signal(signal.SIGTERM)


def _main_command(config_path: str, workdir: str, args: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "eees_jax.main", f"--config={config_path}", f"--workdir={workdir}",
          *args]


@dataclasses.dataclass
class Run:
  """One `eees_jax.main` run of the table."""
  row: str
  seed: int
  split: int | None
  workdir: str
  config_path: str
  args: list[str]            # the main flags after --config/--workdir
  config: Any                # the resolved ConfigDict

  @property
  def command(self) -> list[str]:
    return _main_command(self.config_path, self.workdir, self.args)


def run_args(row: str, seed: int, extra: Sequence[str], holdout: bool,
             split: int | None = None) -> list[str]:
  """The `eees_jax.main` overrides of one run (after --config and --workdir)."""
  if row not in ABLATION_ROWS:
    raise app.UsageError(f"--rows: {row!r} is not one of {list(ABLATION_ROWS)}")
  args = [f"--config.seed={seed}"]
  args += [f"--config.{k}={v}" for k, v in ABLATION_ROWS[row].items()]
  if holdout:
    args.append("--config.dataset.holdout=True")
  if split is not None:
    args.append(f"--config.dataset.split={split}")
  return args + [f"--config.{kv}" for kv in extra]


def run_command(config: str, workdir: str, row: str, seed: int, extra: Sequence[str],
                holdout: bool, split: int | None = None) -> list[str]:
  """The `eees_jax.main` command line of one run."""
  return _main_command(config, workdir, run_args(row, seed, extra, holdout, split))


def resolve_config(config_path: str, args: Sequence[str]):
  """The config `eees_jax.main --config=<config_path> <args>` runs with (parsed the same way)."""
  argv = ["eees_jax.main", f"--config={config_path}", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
    return fv.config
  except (flags.Error, OSError, ValueError, TypeError, KeyError, AttributeError) as e:
    raise app.UsageError(f"{' '.join(args)}: {e}") from None


def parse_splits(values: Sequence[str]) -> list[int]:
  """["1-10"] or ["1", "3"] -> [1, ..., 10] / [1, 3]."""
  out = []
  for v in values:
    lo, _, hi = v.partition("-")
    try:
      out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
      raise app.UsageError(f"--splits: {v!r} is not a split number or a range like 1-10") from None
  if len(set(out)) != len(out):
    raise app.UsageError(f"--splits: {values} names a split twice")
  return out


def plan(config_path: str, root: str, rows: Sequence[str], seeds: Sequence[int],
         extra: Sequence[str], holdout: bool, splits: Sequence[int]) -> list[Run]:
  """Every run of the table, with its resolved and validated config."""
  runs = []
  for row in rows:
    for seed in seeds:
      for split in (list(splits) or [None]):
        workdir = os.path.join(root, row, f"seed{seed}")
        if split is not None:
          workdir = os.path.join(workdir, f"split{split}")
        args = run_args(row, seed, extra, holdout, split)
        config = resolve_config(config_path, args)
        runs.append(Run(row, seed, split, workdir, config_path, args, config))
  spec = registry.get(runs[0].config.dataset.name)
  if splits and not spec.splits:
    raise app.UsageError(f"--splits: {spec.title} trains one model for all its test data; "
                         "--splits is for data sets with per-split models (RegDB)")
  bad = [s for s in splits if s not in spec.splits]
  if bad:
    raise app.UsageError(f"--splits: {bad} are not among {spec.title}'s splits {list(spec.splits)}")
  for run in runs:
    try:
      config_validation.validate(run.config)
    except config_validation.ConfigError as e:
      raise app.UsageError(f"run {run.row} seed {run.seed}"
                           + (f" split {run.split}" if run.split is not None else "")
                           + f": {e}") from None
  return runs


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def config_differences(recorded: dict, wanted: dict) -> list[str]:
  """'key: recorded -> wanted' for every differing key that can change results
  (config_validation.RESULT_NEUTRAL may differ, and so may the settings of a loss term that is off
  in both: eees_jax.losses.eees_loss reads none of them, so tuning a term's temperature does not
  make the rows without that term stale)."""
  return config_validation.differences(
      recorded, wanted, config_validation.RESULT_NEUTRAL + _terms_off_in_both(recorded, wanted))


def _terms_off_in_both(recorded: dict, wanted: dict) -> tuple[str, ...]:
  """'loss.<term>.' for each loss section with an `enabled` switch that is off in both configs."""
  def off(config: dict, term: str) -> bool:
    section = config.get("loss", {}).get(term)
    return isinstance(section, dict) and section.get("enabled") is False
  return tuple(f"loss.{term}." for term in recorded.get("loss", {})
               if off(recorded, term) and off(wanted, term))


def check_reusable(run: Run) -> None:
  """Refuses a run folder that holds another config's run (or an unrecorded one)."""
  if not os.path.isdir(run.workdir) or not os.listdir(run.workdir):
    return
  path = os.path.join(run.workdir, RECORD)
  if not os.path.isfile(path):
    raise StaleRunError(
        f"{run.workdir} holds a run this ablation did not record (no {RECORD}: started by hand or "
        "by an older version), so it cannot tell whether it matches this table; delete the folder "
        "to rerun it, or use another --workdir")
  with open(path) as f:
    recorded = json.load(f)
  diff = config_differences(recorded["config"], _config_json(run.config))
  if diff:
    raise StaleRunError(
        f"{run.workdir} holds a run of another config (recorded command: "
        f"{' '.join(recorded['command'])}); it differs in\n  " + "\n  ".join(diff)
        + "\nUse another --workdir for this table, or delete that folder to rerun it.")


def _record(run: Run) -> None:
  os.makedirs(run.workdir, exist_ok=True)
  path = os.path.join(run.workdir, RECORD)
  if not os.path.isfile(path):
    with open(path, "w") as f:
      json.dump({"command": run.command[1:], "config": _config_json(run.config)}, f, indent=1)


def _launch(cmd: list[str], log, env: dict) -> int:
  """Runs one `eees_jax.main` process to its end; its exit code."""
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
  with _RUNNING_LOCK:
    _RUNNING.add(proc)
  try:
    return proc.wait()
  finally:
    with _RUNNING_LOCK:
      _RUNNING.discard(proc)


def _run_one(cmd: list[str], workdir: str, env: dict) -> dict:
  """Runs (resuming it after a preemption) or reuses one run; its results."""
  report_path = os.path.join(workdir, "report", "results.json")
  log_path = os.path.join(workdir, "run.log")
  resumes = 0
  while not os.path.isfile(report_path):
    if _STOP.is_set():
      raise AblationPreempted("SIGTERM: stopped before " + workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(log_path, "a") as log:
      code = _launch(cmd, log, env)
    if code == PREEMPTED_EXIT_CODE:  # it saved after a SIGTERM: the same command resumes it
      if _STOP.is_set():
        raise AblationPreempted(f"SIGTERM: {workdir} saved its progress")
      resumes += 1
      if resumes > MAX_RESUMES:
        raise RunFailedError(f"run preempted {resumes} times in a row; see {log_path}: "
                             + " ".join(cmd))
      continue
    if code != 0:
      raise RunFailedError(f"run failed (exit {code}); see {log_path}: " + " ".join(cmd))
    if not os.path.isfile(report_path):
      raise RunFailedError(f"run exited without its report ({report_path}); see {log_path}. The "
                           "same ablation command resumes it from its checkpoint")
  with open(report_path) as f:
    return json.load(f)


def _section(result: dict, section: str | None) -> dict:
  """The settings of a run's results (section None), or of its results[section] (absent: none)."""
  part = result if section is None else result.get(section) or {}
  return part.get("settings", {})


def summarise(results: dict[str, dict[int, dict]], settings: Sequence[str],
              section: str | None = None) -> dict:
  """{row: {setting: {metric: {mean, std, min, max, n}}}} over seeds; std is the sample std.
  section: summarise results[section]["settings"] (e.g. "text_retrieval") instead of the image
  protocol's settings."""
  table = {}
  for row, by_seed in results.items():
    table[row] = {}
    for setting in settings:
      values = {m: [_section(r, section)[setting]["mean"][m] for r in by_seed.values()
                    if setting in _section(r, section)] for m in METRICS}
      table[row][setting] = {
          m: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
              "min": min(v), "max": max(v), "n": len(v)} for m, v in values.items() if v}
  return table


def markdown(table: dict, settings: Sequence[str], title: str, note: str = "") -> str:
  lines = [f"## {title}", "",
           "| Row | " + " | ".join(f"{s} {m}" for s in settings for m in ("Rank-1", "mAP")) + " |",
           "|---|" + "---|" * (2 * len(settings))]
  for row, by_setting in table.items():
    cells = []
    for s in settings:
      for m in METRICS:
        c = by_setting.get(s, {}).get(m)
        cells.append("-" if c is None else
                     f"{c['mean']:.2f} ± {c['std']:.2f} ({c['min']:.2f}-{c['max']:.2f})")
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  n = {c["n"] for st in table.values() for ms in st.values() for c in ms.values()}
  lines += ["", f"Mean ± sample standard deviation (range) over {'/'.join(map(str, sorted(n)))} "
            f"seeds, in percent.{(' ' + note) if note else ''}"]
  return "\n".join(lines) + "\n"


def text_columns(results: dict[str, dict[int, dict]], config) -> tuple[list[str], dict]:
  """(settings, table) of the runs' text-to-person rows; ([], {}) when no run has them."""
  if not any(r.get("text_retrieval") for by_seed in results.values() for r in by_seed.values()):
    return [], {}
  settings = text_retrieval.setting_names(tuple(config.eval.modes))
  return settings, summarise(results, settings, section="text_retrieval")


def text_note(results: dict[str, dict[int, dict]]) -> str:
  """Under the text table: where the queries come from, and what ties each row's joint feature to
  text (from its runs' reports; a row without text rows is said to have none)."""
  rows = []
  for row, by_seed in results.items():
    notes = sorted({r["text_retrieval"]["alignment"]["note"] for r in by_seed.values()
                    if r.get("text_retrieval")})
    rows.append(f"{row}: {'; '.join(notes) if notes else 'no text rows (eval.text_retrieval off)'}.")
  return (f"Queries: {text_retrieval.QUERY_SOURCE} (captions of test identities, never seen in "
          "training); each run's report/results.md describes the protocol. Text alignment per row: "
          + " ".join(rows))


def _split_range(splits: Sequence[int]) -> str:
  s = sorted(splits)
  return f"{s[0]}-{s[-1]}" if s == list(range(s[0], s[-1] + 1)) and len(s) > 1 else \
      ",".join(map(str, s))


def run_table(config_path: str, root: str, rows: Sequence[str], seeds: Sequence[int],
              extra: Sequence[str] = (), holdout: bool = False, splits: Sequence[int] = (),
              parallel: int = 1) -> dict:
  """Plans, checks, runs (or reuses) every run; writes and returns the table (ablation.json)."""
  runs = plan(config_path, root, rows, seeds, extra, holdout, splits)
  for run in runs:  # every folder before any work: a mismatch never surfaces after hours
    check_reusable(run)
  env = dict(os.environ)
  if parallel > 1:
    # Several processes share one accelerator: none may pre-allocate most of its memory.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  first = runs[0].config
  spec = registry.get(first.dataset.name)
  settings = registry.settings(first)
  head = settings[0]
  start = time.time()
  by_run: dict[tuple[str, int, int | None], dict] = {}
  with futures.ThreadPoolExecutor(max(parallel, 1)) as pool:
    todo = {}
    for run in runs:
      _record(run)
      todo[pool.submit(_run_one, run.command, run.workdir, env)] = run
    for i, done in enumerate(futures.as_completed(todo), 1):
      run = todo[done]
      res = by_run[(run.row, run.seed, run.split)] = done.result()
      mean = res["settings"][head]["mean"]
      where = f"{run.row} seed {run.seed}" + (f" split {run.split}" if run.split is not None else "")
      print(f"[{i}/{len(runs)}] {where}: {head} Rank-1 {mean['rank1']:.2f} mAP {mean['mAP']:.2f} "
            f"({time.time() - start:.0f} s)", flush=True)

  results: dict[str, dict[int, dict]] = {row: {} for row in rows}
  for row in rows:
    for seed in seeds:
      if not splits:
        results[row][seed] = by_run[(row, seed, None)]
        continue
      merged = protocols.merge_splits([by_run[(row, seed, s)] for s in splits])
      results[row][seed] = merged
      report.write_report(merged, os.path.join(root, row, f"seed{seed}", "report"),
                          title=f"EEES on {spec.title}, {row}, seed {seed}: mean over splits "
                                f"{_split_range(splits)}")
  table = summarise(results, settings)
  what = "held-out val ids (tuning, not a test result)" if holdout else "test ids"
  title = f"Ablation on {config_path} ({spec.title}), {what}" + (
      f", {' '.join(extra)}" if extra else "")
  note = (f"Each seed's value is the mean over {spec.title} splits {_split_range(splits)} "
          "(one model per split)." if splits else "")
  md = markdown(table, settings, title, note)
  text_settings, text_table = text_columns(results, first)
  if text_table:
    md += "\n" + markdown(text_table, text_settings, f"{text_retrieval.SECTION_TITLE}, {what}",
                          text_note(results))
  with open(os.path.join(root, "ablation.md"), "w") as f:
    f.write(md)
  with open(os.path.join(root, "ablation.json"), "w") as f:
    json.dump({"config": config_path, "dataset": spec.name, "overrides": list(extra),
               "holdout": holdout, "seeds": list(seeds), "splits": list(splits),
               "settings": settings,
               "commands": {os.path.relpath(r.workdir, root): r.command[1:] for r in runs},
               "table": table, "text_settings": text_settings, "text_table": text_table}, f,
              indent=1)
  print(md)
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    run_table(_CONFIG.value, _WORKDIR.value, _ROWS.value, [int(s) for s in _SEEDS.value],
              _SET.value, _HOLDOUT.value, parse_splits(_SPLITS.value), _PARALLEL.value)
  except AblationPreempted as e:
    print(f"{e}; rerun the same ablation command to resume (exit code {PREEMPTED_EXIT_CODE})",
          file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)
  except (StaleRunError, RunFailedError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
