"""The ablation runner: command lines, the per-seed table, RegDB's mean over splits, stale runs.

Runs are faked: the process launch is replaced by a function that writes the report a run would write,
with numbers that are a known function of (row, seed, split), so every table cell is computed
here by hand.
"""
import json
import os
import re
import statistics
import sys
import threading
import time

import pytest
from absl import app

from configs.common import ABLATION_ROWS
from eees_jax import ablation
from eees_jax.evaluation import text_retrieval

ROW_OFFSET = {"baseline": 0.0, "ese": 1.0, "ese_cvsc": 2.0, "ese_cmsp": 3.0, "full": 4.0}
SETTINGS = {"regdb": ("visible to thermal", "thermal to visible"),
            "llcm": ("infrared to visible", "visible to infrared"),
            "synthetic": ("all-search single-shot", "indoor-search single-shot")}


def fake_rank1(row, seed, split, setting_index):
  return 10.0 * seed + 2.0 * (split or 0) + ROW_OFFSET[row] + 0.5 * setting_index


def _trial(key, value, rank1, mAP):
  cmc = [min(100.0, rank1 + i) for i in range(20)]
  return {key: value, "rank1": rank1, "rank5": cmc[4], "rank10": cmc[9], "rank20": cmc[19],
          "mAP": mAP, "mINP": mAP / 2, "cmc": cmc, "cmc_standard": cmc, "num_queries": 5,
          "num_gallery": 5, "num_valid_queries": 5}


class FakeRuns:
  """Stands in for ablation._launch: writes <workdir>/report/results.json like eees_jax.main."""

  def __init__(self, dataset):
    self.dataset, self.commands = dataset, []

  def __call__(self, cmd, log, env):
    self.commands.append(cmd)
    arg = lambda name: next((a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")), None)
    workdir = arg("workdir")
    row = os.path.relpath(workdir, self.root).split(os.sep)[0]
    seed, split = int(arg("config.seed")), arg("config.dataset.split")
    split = int(split) if split is not None else None
    key = "split" if self.dataset == "regdb" else "trial"
    settings = {}
    for i, name in enumerate(SETTINGS[self.dataset]):
      r1 = fake_rank1(row, seed, split, i)
      t = _trial(key, split if split is not None else 0, r1, 2 * r1)
      settings[name] = {"query": "visible", "gallery": "infrared", "reranked": False,
                        "cmc_kind": "standard", "trials": [t],
                        "mean": {k: v for k, v in t.items() if k != key}}
    results = {"dataset": self.dataset, "protocol": self.dataset, "trial_key": key,
               "max_rank": 20, "settings": settings}
    if "--config.eval.text_retrieval=True" in cmd:  # the trainer's extra rows: 100 + the image rows
      config = ablation.resolve_config(arg("config"), cmd[5:])
      text = {}
      for i, name in enumerate(text_retrieval.setting_names(tuple(config.eval.modes))):
        r1 = 100.0 + fake_rank1(row, seed, split, i)
        t = _trial(key, 0, r1, 2 * r1)
        text[name] = {"query": "text", "gallery": "infrared", "reranked": False,
                      "cmc_kind": "unique-identity", "trials": [t],
                      "mean": {k: v for k, v in t.items() if k != key}}
      results["text_retrieval"] = text_retrieval.report_section(
          {"settings": text, "query_source": text_retrieval.QUERY_SOURCE, "text_weight": 0.5},
          config)
    os.makedirs(os.path.join(workdir, "report"), exist_ok=True)
    with open(os.path.join(workdir, "report", "results.json"), "w") as f:
      json.dump(results, f)
    return 0


@pytest.fixture
def fake(monkeypatch, tmp_path):
  def make(dataset):
    runs = FakeRuns(dataset)
    runs.root = str(tmp_path / "table")
    monkeypatch.setattr(ablation, "_launch", runs)
    return runs
  return make


@pytest.fixture
def data_root(tmp_path):
  root = tmp_path / "data"
  root.mkdir()
  return str(root)


def test_rows_switch_exactly_the_named_terms():
  on = lambda row: {t for t in ("ese", "cvsc", "cmsp") if ABLATION_ROWS[row].get(f"loss.{t}.enabled", True)}
  assert on("baseline") == set() and on("ese") == {"ese"} and on("ese_cvsc") == {"ese", "cvsc"}
  assert on("ese_cmsp") == {"ese", "cmsp"} and on("full") == {"ese", "cvsc", "cmsp"}


def test_run_command():
  cmd = ablation.run_command("configs/synthetic.py", "w/ese/seed2", "ese", 2, ["optim.lr=3e-3"], True)
  assert cmd[:3] == [sys.executable, "-m", "eees_jax.main"]
  assert cmd[3:] == ["--config=configs/synthetic.py", "--workdir=w/ese/seed2", "--config.seed=2",
                     "--config.loss.cvsc.enabled=False", "--config.loss.cmsp.enabled=False",
                     "--config.dataset.holdout=True", "--config.optim.lr=3e-3"]
  cmd = ablation.run_command("configs/regdb.py", "w/full/seed0/split4", "full", 0, [], False, 4)
  assert cmd[5:] == ["--config.seed=0", "--config.dataset.split=4"]


def test_summary_against_hand_computed_values():
  mean = lambda r1, m: {"mean": {"rank1": r1, "mAP": m}}
  result = lambda a, b, c, d: {"settings": {"all-search single-shot": mean(a, b),
                                            "indoor-search single-shot": mean(c, d)}}
  runs = {"full": {0: result(10.0, 20.0, 1, 2), 1: result(14.0, 26.0, 3, 4), 2: result(12.0, 20.0, 5, 6)}}
  settings = SETTINGS["synthetic"]
  t = ablation.summarise(runs, settings)["full"]["all-search single-shot"]
  assert t["rank1"] == {"mean": 12.0, "std": 2.0, "min": 10.0, "max": 14.0, "n": 3}
  assert t["mAP"]["mean"] == pytest.approx(22.0) and t["mAP"]["std"] == pytest.approx(statistics.stdev([20, 26, 20]))
  md = ablation.markdown(ablation.summarise(runs, settings), settings, "t")
  assert "| full | 12.00 ± 2.00 (10.00-14.00) | 22.00 ± 3.46 (20.00-26.00) | 3.00 ± 2.00 (1.00-5.00) |" in md


def test_regdb_mean_over_splits_in_one_command(fake, data_root):
  runs = fake("regdb")
  table = ablation.run_table("configs/regdb.py", runs.root, ["baseline", "full"], [0, 1],
                             [f"dataset.root={data_root}"], splits=ablation.parse_splits(["1-3"]))
  assert len(runs.commands) == 2 * 2 * 3
  assert {c[-2] for c in runs.commands} == {f"--config.dataset.split={s}" for s in (1, 2, 3)}
  # Hand-computed: a seed's value is the mean over splits 1..3 of 10 seed + 2 split + row (+ 0.5
  # for the second direction), i.e. 10 seed + 4 + row; over seeds 0, 1: mean 9 + row, std sqrt(50).
  for row in ("baseline", "full"):
    for i, setting in enumerate(SETTINGS["regdb"]):
      per_seed = [10.0 * seed + 4.0 + ROW_OFFSET[row] + 0.5 * i for seed in (0, 1)]
      cell = table[row][setting]["rank1"]
      assert cell["mean"] == pytest.approx(statistics.fmean(per_seed))
      assert cell["std"] == pytest.approx(statistics.stdev(per_seed))
      assert (cell["min"], cell["max"], cell["n"]) == (per_seed[0], per_seed[1], 2)
      assert table[row][setting]["mAP"]["mean"] == pytest.approx(2 * statistics.fmean(per_seed))
  md = open(os.path.join(runs.root, "ablation.md")).read()
  assert ("| full | 13.00 ± 7.07 (8.00-18.00) | 26.00 ± 14.14 (16.00-36.00) | "
          "13.50 ± 7.07 (8.50-18.50) | 27.00 ± 14.14 (17.00-37.00) |") in md
  assert "visible to thermal Rank-1" in md and "mean over RegDB splits 1-3" in md
  # Each row and seed also gets the mean-over-splits report, every split a row of it.
  merged = json.load(open(os.path.join(runs.root, "full", "seed1", "report", "results.json")))
  v2t = merged["settings"]["visible to thermal"]
  assert [t["split"] for t in v2t["trials"]] == [1, 2, 3]
  assert v2t["mean"]["rank1"] == pytest.approx(10 + 4 + 4)
  # Run again: every run is reused, nothing is trained.
  ablation.run_table("configs/regdb.py", runs.root, ["baseline", "full"], [0, 1],
                     [f"dataset.root={data_root}"], splits=[1, 2, 3])
  assert len(runs.commands) == 12


def test_llcm_table_takes_its_settings_from_the_registry(fake, data_root):
  runs = fake("llcm")
  table = ablation.run_table("configs/llcm.py", runs.root, ["full"], [3],
                             [f"dataset.root={data_root}"])
  assert list(table["full"]) == list(SETTINGS["llcm"])
  assert table["full"]["visible to infrared"]["rank1"]["mean"] == pytest.approx(30 + 4 + 0.5)


def test_text_rows_make_a_second_table_with_each_rows_text_alignment(fake):
  """With eval.text_retrieval the runs' text rows are summarised like the image rows (hand-computed:
  100 + 10 seed + row offset + 0.5 per setting, mean over seeds 0 and 2 = 110 + offset), and the
  note says what ties each row's joint feature to text."""
  runs = fake("synthetic")
  rows, seeds = ["baseline", "ese"], [0, 2]
  ablation.run_table("configs/synthetic.py", runs.root, rows, seeds,
                     ["eval.text_retrieval=True", "eval.modes=('all',)"])
  md = open(os.path.join(runs.root, "ablation.md")).read()
  image_md, text_md = md.split(f"## {text_retrieval.SECTION_TITLE}, test ids")
  names = text_retrieval.setting_names(("all",))
  assert all(name not in image_md for name in names)
  assert "| Row | " + " | ".join(f"{n} {m}" for n in names for m in ("Rank-1", "mAP")) in text_md
  for row in rows:
    cells = []
    for i in range(len(names)):
      per_seed = [100.0 + 10.0 * seed + ROW_OFFSET[row] + 0.5 * i for seed in seeds]
      for values in (per_seed, [2 * v for v in per_seed]):
        cells.append(f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} "
                     f"({min(values):.2f}-{max(values):.2f})")
    assert f"| {row} | " + " | ".join(cells) + " |" in text_md, row
  assert "baseline: no text term (baseline): v was trained by the identity and triplet losses" in text_md
  assert "ese: v was trained toward the text tower's description features by ESE." in text_md
  saved = json.load(open(os.path.join(runs.root, "ablation.json")))
  assert saved["text_settings"] == names
  assert saved["text_table"]["ese"][names[0]]["rank1"]["mean"] == pytest.approx(111.0)
  # Without the switch there are no text rows and no second table.
  runs = fake("synthetic")
  runs.root += "_plain"
  ablation.run_table("configs/synthetic.py", runs.root, ["ese"], [0])
  assert text_retrieval.SECTION_TITLE not in open(os.path.join(runs.root, "ablation.md")).read()
  assert json.load(open(os.path.join(runs.root, "ablation.json")))["text_table"] == {}


def test_a_changed_config_refuses_a_finished_run_and_names_the_key(fake):
  runs = fake("synthetic")
  ablation.run_table("configs/synthetic.py", runs.root, ["full"], [0], ["optim.lr=3e-3"])
  assert len(runs.commands) == 1
  with pytest.raises(ablation.StaleRunError) as info:
    ablation.run_table("configs/synthetic.py", runs.root, ["full"], [0], ["optim.lr=1e-3"])
  assert "optim.lr: 0.003 there, 0.001 now" in str(info.value)
  assert os.path.join(runs.root, "full", "seed0") in str(info.value)
  with pytest.raises(ablation.StaleRunError, match="dataset.holdout: False there, True now"):
    ablation.run_table("configs/synthetic.py", runs.root, ["full"], [0], ["optim.lr=3e-3"], True)
  assert len(runs.commands) == 1  # refused before running anything
  # Options that change speed, not results, may differ: the run is reused.
  ablation.run_table("configs/synthetic.py", runs.root, ["full"], [0],
                     ["optim.lr=3e-3", "input.threads=1"])
  assert len(runs.commands) == 1


def test_settings_of_a_term_that_is_off_do_not_make_its_row_stale(fake):
  """The baseline reads no ESE setting, so a new ESE temperature reuses its runs; a row with ESE on,
  or a change of the switch itself, is refused."""
  runs = fake("synthetic")
  ablation.run_table("configs/synthetic.py", runs.root, ["baseline", "ese"], [0],
                     ["loss.ese.tau=0.03"])
  assert len(runs.commands) == 2
  ablation.run_table("configs/synthetic.py", runs.root, ["baseline"], [0],
                     ["loss.ese.tau=0.07", "loss.cvsc.kd_temperature=2.5", "loss.cmsp.weight=3.5"])
  assert len(runs.commands) == 2
  with pytest.raises(ablation.StaleRunError, match="loss.ese.tau: 0.03 there, 0.07 now"):
    ablation.run_table("configs/synthetic.py", runs.root, ["ese"], [0], ["loss.ese.tau=0.07"])
  with pytest.raises(ablation.StaleRunError, match="loss.wrt.weight: 0.15 there, 0.35 now"):
    ablation.run_table("configs/synthetic.py", runs.root, ["baseline"], [0],
                       ["loss.ese.tau=0.03", "loss.wrt.weight=0.35"])
  with pytest.raises(ablation.StaleRunError, match="loss.ese.enabled: False there, True now"):
    ablation.run_table("configs/synthetic.py", runs.root, ["baseline"], [0],
                       ["loss.ese.tau=0.03", "loss.ese.enabled=True"])
  assert len(runs.commands) == 2


def test_a_run_folder_without_a_record_is_refused(fake):
  runs = fake("synthetic")
  os.makedirs(os.path.join(runs.root, "full", "seed0", "checkpoints"))
  with pytest.raises(ablation.StaleRunError, match="did not record"):
    ablation.run_table("configs/synthetic.py", runs.root, ["full"], [0])
  assert not runs.commands


def test_bad_overrides_and_splits_fail_before_any_run(fake, data_root):
  runs = fake("synthetic")
  with pytest.raises(app.UsageError, match=re.escape("optim.lr = -1.0: a finite number > 0")):
    ablation.run_table("configs/synthetic.py", runs.root, ["full"], [0], ["optim.lr=-1"])
  with pytest.raises(app.UsageError, match="no_such_key"):
    ablation.run_table("configs/synthetic.py", runs.root, ["full"], [0], ["optim.no_such_key=1"])
  with pytest.raises(app.UsageError, match="per-split models"):
    ablation.run_table("configs/synthetic.py", runs.root, ["full"], [0], splits=[1])
  with pytest.raises(app.UsageError, match=r"\[11\] are not among RegDB's splits"):
    ablation.run_table("configs/regdb.py", runs.root, ["full"], [0], [f"dataset.root={data_root}"],
                       splits=[10, 11])
  assert not runs.commands
  assert ablation.parse_splits(["1-3", "7"]) == [1, 2, 3, 7]


def test_a_preempted_run_is_resumed_and_a_preempted_ablation_stops(tmp_path, monkeypatch):
  workdir = str(tmp_path / "full" / "seed0")
  report = os.path.join(workdir, "report", "results.json")
  # A run that saves and exits as preempted (75) on its first launch, and finishes on the second.
  script = (f"import os, sys; os.makedirs(os.path.dirname({report!r}), exist_ok=True)\n"
            f"if os.path.exists({report!r} + '.started'):\n"
            f"  open({report!r}, 'w').write('{{\"settings\": {{}}}}')\n"
            f"else:\n"
            f"  open({report!r} + '.started', 'w').close(); sys.exit({ablation.PREEMPTED_EXIT_CODE})\n")
  cmd = [sys.executable, "-c", script]
  assert ablation._run_one(cmd, workdir, {}) == {"settings": {}}
  assert open(os.path.join(workdir, "run.log")).read() == ""  # two launches, nothing printed
  # A run that exits 0 without a report is an error that says how to resume.
  with pytest.raises(ablation.RunFailedError, match="same ablation command resumes it"):
    ablation._run_one([sys.executable, "-c", "pass"], str(tmp_path / "other"), {})
  # When the ablation itself got the SIGTERM, it stops instead of resuming.
  os.remove(report)
  os.remove(report + ".started")
  monkeypatch.setattr(ablation, "_STOP", threading.Event())
  ablation._STOP.set()
  with pytest.raises(ablation.AblationPreempted):
    ablation._run_one(cmd, workdir, {})
  assert not os.path.exists(report + ".started")  # nothing was launched


def test_a_sigterm_to_the_ablation_reaches_its_running_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(ablation, "_STOP", threading.Event())
  ready = tmp_path / "ready"
  child = (f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(75)); "
           f"open({str(ready)!r}, 'w').close(); time.sleep(60)")
  codes = []
  with open(tmp_path / "log", "w") as log:
    thread = threading.Thread(target=lambda: codes.append(
        ablation._launch([sys.executable, "-c", child], log, dict(os.environ))))
    thread.start()
    while not ready.exists():
      time.sleep(0.01)
    ablation._on_sigterm(None, None)  # what the ablation's SIGTERM handler does
    thread.join(30)
  assert codes == [ablation.PREEMPTED_EXIT_CODE] and ablation._STOP.is_set()
