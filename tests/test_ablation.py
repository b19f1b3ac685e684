"""The ablation runner: command lines per row, and the mean/std/range table over seeds."""
import statistics
import sys

import pytest

from configs.common import ABLATION_ROWS
from eees_jax import ablation


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


def _result(r1_all, map_all, r1_in, map_in):
  mean = lambda r1, m: {"mean": {"rank1": r1, "mAP": m}}
  return {"settings": {"all-search single-shot": mean(r1_all, map_all),
                       "indoor-search single-shot": mean(r1_in, map_in)}}


def test_summary_against_hand_computed_values():
  runs = {"full": {0: _result(10.0, 20.0, 1, 2), 1: _result(14.0, 26.0, 3, 4), 2: _result(12.0, 20.0, 5, 6)}}
  t = ablation.summarise(runs)["full"]["all-search single-shot"]
  assert t["rank1"] == {"mean": 12.0, "std": 2.0, "min": 10.0, "max": 14.0, "n": 3}
  assert t["mAP"]["mean"] == pytest.approx(22.0) and t["mAP"]["std"] == pytest.approx(statistics.stdev([20, 26, 20]))
  md = ablation.markdown(ablation.summarise(runs), "t")
  assert "| full | 12.00 ± 2.00 (10.00-14.00) | 22.00 ± 3.46 (20.00-26.00) | 3.00 ± 2.00 (1.00-5.00) |" in md


def test_a_run_that_stops_without_a_report_says_how_to_resume(tmp_path):
  stopped = [sys.executable, "-c", "pass"]  # exits 0 and writes no report, like a preempted run
  with pytest.raises(RuntimeError, match="run the same ablation command again to resume"):
    ablation._run_one(stopped, str(tmp_path / "full" / "seed0"), {})
