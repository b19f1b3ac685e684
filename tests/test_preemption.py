"""`python -m eees_jax.main` under real signals and kills, and its error messages.

A training subprocess is stopped with a real SIGTERM (it saves and exits with the documented code),
killed with SIGKILL during a checkpoint write, at a moment a seeded RNG picks, and during the final
evaluation; each time the same command runs again. The run must end with exactly the parameters
of an uninterrupted run (same platform, same programs: bit-identical). Every known error ends the
command with one message and no traceback.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import synthetic
from eees_jax import ablation, train
from _tiny_config import TINY_SET, as_overrides, tiny_config
from test_train import REPO

TOTAL_STEPS = 8
SEED = 16  # picks the SIGTERM step and the delay before the random kill


def _overrides(root: str, **extra) -> dict:
  """tiny_config as command-line overrides, TOTAL_STEPS long, a checkpoint every step."""
  config = tiny_config(root, max_steps=TOTAL_STEPS, checkpoint_every_steps=1)
  return {**as_overrides(config), **extra}


def _command(workdir: str, overrides: dict, *flags: str,
             config: str = "configs/synthetic.py") -> list[str]:
  return ([sys.executable, "-m", "eees_jax.main", f"--config={config}", f"--workdir={workdir}",
           *flags] + [f"--config.{k}={v}" for k, v in overrides.items()])


def test_the_overrides_build_tiny_config_on_the_command_line():
  """The command-line runs here and in tests/test_multiprocess.py train what tiny_config trains."""
  want = tiny_config("data/tiny", max_steps=TOTAL_STEPS, checkpoint_every_steps=1)
  args = [f"--config.{k}={v}" for k, v in _overrides("data/tiny").items()]
  got = ablation.resolve_config(os.path.join(REPO, "configs", "synthetic.py"), args)
  assert len(args) > 20
  assert got.to_dict() == want.to_dict()


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  base = tmp_path_factory.mktemp("preemption")
  root = str(base / "synthetic")
  synthetic.generate(root, **TINY_SET)
  # One device; every launch shares the session's compilation cache (tests/conftest.py).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return dict(base=base, root=root, env=env, overrides=_overrides(root))


class Run:
  """One launch of the command, its output in files, and ways to wait on what it writes."""

  def __init__(self, setting, workdir: str, name: str):
    self.workdir = workdir
    self.out = setting["base"] / f"{name}.out"
    self.err = setting["base"] / f"{name}.err"
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen(_command(workdir, setting["overrides"]), cwd=REPO,
                                   env=setting["env"], stdout=out, stderr=err)

  def text(self) -> tuple[str, str]:
    return self.out.read_text(), self.err.read_text()

  def wait_until(self, condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
      if self.proc.poll() is not None:
        raise AssertionError(f"the run exited ({self.proc.returncode}) before {what}:\n"
                             + self.text()[1][-3000:])
      if time.time() > deadline:
        self.proc.kill()
        raise AssertionError(f"timed out waiting for {what}")
      time.sleep(0.005)

  def finish(self, timeout: float = 600) -> int:
    return self.proc.wait(timeout)


def _listing(workdir: str) -> list[str]:
  folder = os.path.join(workdir, "checkpoints")
  return os.listdir(folder) if os.path.isdir(folder) else []


def committed(workdir: str) -> list[int]:
  """Finished checkpoints: orbax renames <step>.orbax-checkpoint-tmp-* to <step> when done."""
  return sorted(int(n) for n in _listing(workdir) if n.isdigit())


def writing(workdir: str) -> bool:
  return any(".orbax-checkpoint-tmp" in n for n in _listing(workdir))


def saved_params(workdir: str, step: int | None = None):
  """The parameters of checkpoint `step` (default: the latest) as numpy arrays, whatever devices
  and processes wrote them (restored onto one local device)."""
  step = committed(workdir)[-1] if step is None else step
  folder = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(folder).item_metadata
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    state = ckptr.restore(folder, target)
  return jax.tree.map(np.asarray, state["params"])


def final_params(workdir: str) -> dict:
  assert committed(workdir)[-1] == TOTAL_STEPS
  return saved_params(workdir, TOTAL_STEPS)


@pytest.fixture(scope="module")
def uninterrupted(setting):
  workdir = str(setting["base"] / "uninterrupted")
  run = Run(setting, workdir, "uninterrupted")
  assert run.finish() == 0, run.text()[1][-3000:]
  out, err = run.text()
  assert "Rank-1" in out and os.path.isfile(os.path.join(workdir, "report", "results.json"))
  assert "Traceback" not in err
  return final_params(workdir)


def test_sigterm_and_kills_at_any_moment_end_with_the_uninterrupted_parameters(setting,
                                                                               uninterrupted):
  rng = random.Random(SEED)
  workdir = str(setting["base"] / "interrupted")

  # 1. A real SIGTERM mid-training: it saves the step it reached and exits with code 75.
  run = Run(setting, workdir, "sigterm")
  at = rng.randint(2, TOTAL_STEPS - 4)
  run.wait_until(lambda: at in committed(workdir), f"checkpoint {at}")
  run.proc.send_signal(signal.SIGTERM)
  assert run.finish() == train.PREEMPTED_EXIT_CODE == 75, run.text()[1][-3000:]
  err = run.text()[1]
  saved = committed(workdir)[-1]
  assert at < saved < TOTAL_STEPS
  assert f"SIGTERM: saved step {saved} to" in err and "rerun the same command" in err, err[-2000:]
  assert "Traceback" not in err

  # 2. kill -9 while a checkpoint is being written (orbax's temporary folder exists).
  run = Run(setting, workdir, "kill_during_write")
  run.wait_until(lambda: "Resumed from step" in run.text()[0] and writing(workdir),
                 "a checkpoint write")
  run.proc.kill()
  run.finish()
  assert f"Resumed from step {saved}" in run.text()[0]

  # 3. kill -9 at a random moment of training.
  run = Run(setting, workdir, "kill_random")
  run.wait_until(lambda: "Resumed from step" in run.text()[0], "the restore")
  time.sleep(rng.uniform(0.0, 1.5))
  run.proc.kill()
  run.finish()

  # 4. kill -9 during the final evaluation: the final checkpoint was written before it.
  run = Run(setting, workdir, "kill_during_eval")
  run.wait_until(lambda: "evaluation: features" in run.text()[1], "the final evaluation")
  run.proc.kill()
  run.finish()
  assert committed(workdir)[-1] == TOTAL_STEPS
  assert not os.path.exists(os.path.join(workdir, "report", "results.json"))

  # 5. The same command once more: it evaluates the final checkpoint.
  run = Run(setting, workdir, "last")
  assert run.finish() == 0, run.text()[1][-3000:]
  assert f"Resumed from step {TOTAL_STEPS}" in run.text()[0]
  assert os.path.isfile(os.path.join(workdir, "report", "results.json"))
  got = final_params(workdir)
  for (path, want), have in zip(jax.tree_util.tree_leaves_with_path(uninterrupted),
                                jax.tree.leaves(got)):
    np.testing.assert_array_equal(have, want, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# Errors a person can act on.
# ----------------------------------------------------------------------------------------------

def test_known_errors_end_with_one_message_and_no_traceback(setting, uninterrupted, tmp_path):
  root, base = setting["root"], setting["overrides"]
  empty = tmp_path / "empty_data"
  empty.mkdir()
  corrupt = str(tmp_path / "corrupt")
  shutil.copytree(str(setting["base"] / "uninterrupted"), corrupt)
  for step in committed(corrupt):
    metadata = os.path.join(corrupt, "checkpoints", str(step), "state", "_METADATA")
    data = open(metadata, "rb").read()
    open(metadata, "wb").write(data[:len(data) // 2])
  w = str(tmp_path / "w")
  sysu = "configs/sysu.py"
  cases = {  # name: (workdir, overrides, config file, exit code, what the message must say)
      "bad value": (w, dict(base, **{"model.dtype": "bf16"}), None, 1,
                    "model.dtype = 'bf16': one of float32, bfloat16, float16"),
      "unknown key": (w, dict(base, **{"optim.learning_rate": 1}), None, 2, "no such config key"),
      "bad type": (w, dict(base, **{"input.height": "tall"}), None, 2, "input.height"),
      "missing data": (w, {"dataset.root": str(tmp_path / "nowhere")}, sysu, 1, "dataset.root"),
      "unreadable data": (w, {"dataset.root": str(empty)}, sysu, 1, str(empty)),
      "missing CLIP file": (w, dict(base, **{"model.init.checkpoint": "weights/none.pt"}), None, 1,
                            "weights/none.pt"),
      "corrupt workdir": (corrupt, base, None, 1, "no checkpoint in"),
      "foreign synthetic CLIP folder": (w, dict(base, **{"pretrain.enabled": True,
                                                         "model.init.checkpoint": str(empty)}),
                                        None, 1, "was not written by eees_jax.pretrain_clip"),
      "missing config file": (w, {}, "configs/nope.py", 2, "--config=configs/nope.py does not load"),
  }
  procs = {}
  for name, (workdir, overrides, config, _, _) in cases.items():
    cmd = _command(workdir, overrides, config=config or "configs/synthetic.py")
    procs[name] = subprocess.Popen(cmd, cwd=REPO, env=setting["env"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=600)
    code, message = cases[name][3], cases[name][4]
    assert proc.returncode == code, (name, err[-3000:])
    assert message in err, (name, err[-3000:])
    assert "Traceback" not in err and "Event loop is closed" not in err, (name, err[-3000:])
    assert err.count("error: ") == 1, (name, err[-3000:])
  assert not os.path.exists(os.path.join(w, "config.json"))
  # --verbose shows where a known error came from.
  proc = subprocess.run(_command(w, dict(base, **{"model.dtype": "bf16"}), "--verbose"), cwd=REPO,
                        env=setting["env"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
