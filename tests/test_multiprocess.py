"""Multi-host training for real on one machine: two processes on 127.0.0.1, joined by
jax.distributed (gloo CPU collectives), one CPU device each.

Each process feeds its half of every global batch and writes its part of the orbax checkpoint
(FSDP splits the larger parameters between the two). The run must equal a one-process run on two
devices (losses and parameters, to float rounding), stop together at one step when only one
process gets a SIGTERM, and resume after both are killed.
"""
import glob
import os
import signal
import socket
import subprocess
import time
from unittest import mock

import jax
import numpy as np

from data_pipelines import synthetic
from eees_jax import train, xla_cpu
from test_preemption import _command, _overrides, committed, saved_params
from _tiny_config import TINY_SET, tiny_config
from test_train import REPO

TOTAL = 6
FSDP = {"mesh.fsdp": True, "mesh.fsdp_min_size": 1024}
ROUNDING = dict(rtol=2e-4, atol=2e-5)
# Eigen's convolutions sum in an order set by the threads each device gets, which differ between
# two processes and one process with two devices; Adam amplifies that rounding beyond ROUNDING in a
# few steps. YNNPACK's do not, so both set-ups compare on it (eees_jax/xla_cpu.py).
PIN_KERNELS = {xla_cpu.ENV_CONVOLUTIONS: "ynnpack"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Pair:
  """Both processes of one launch of the same command."""

  def __init__(self, base, root, workdir, name):
    port = _free_port()
    overrides = _overrides(root, **{"train.max_steps": TOTAL, **FSDP})
    self.procs, self.errs = [], []
    for i in range(2):
      env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                 **PIN_KERNELS, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(i))  # and the session's compilation cache (conftest.py)
      err = base / f"{name}.{i}.err"
      self.errs.append(err)
      with open(base / f"{name}.{i}.out", "w") as out, open(err, "w") as e:
        self.procs.append(subprocess.Popen(_command(workdir, overrides), cwd=REPO, env=env,
                                           stdout=out, stderr=e))

  def stderr(self, i: int) -> str:
    return self.errs[i].read_text()

  def wait_until(self, condition, what: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not condition():
      if any(p.poll() is not None for p in self.procs) or time.time() > deadline:
        self.kill()
        raise AssertionError(f"gave up waiting for {what}:\n" + self.stderr(0)[-2000:]
                             + "\n---\n" + self.stderr(1)[-2000:])
      time.sleep(0.01)

  def kill(self) -> None:
    for p in self.procs:
      p.kill()
    for p in self.procs:
      p.wait()

  def finish(self, timeout: float = 600) -> list[int]:
    return [p.wait(timeout) for p in self.procs]


def _losses(workdir: str) -> dict[int, float]:
  """train/loss/total per step from the TensorBoard files (the last value when a step reran)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*")),
                     key=os.path.getmtime):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == "train/loss/total":
          out[event.step] = v.simple_value
  return out


def test_two_processes_train_like_one_stop_together_and_resume(tmp_path):
  root = str(tmp_path / "synthetic")
  synthetic.generate(root, **TINY_SET)
  workdir = str(tmp_path / "two")

  # 1. Both processes train; only process 1 gets a SIGTERM: both save the same step and exit 75.
  pair = Pair(tmp_path, root, workdir, "sigterm")
  pair.wait_until(lambda: 2 in committed(workdir), "checkpoint 2")
  pair.procs[1].send_signal(signal.SIGTERM)
  assert pair.finish() == [train.PREEMPTED_EXIT_CODE] * 2, pair.stderr(0)[-2000:]
  saved = committed(workdir)[-1]
  assert 2 < saved < TOTAL
  for i in range(2):
    assert f"SIGTERM: saved step {saved} to" in pair.stderr(i), pair.stderr(i)[-2000:]
  # Each process wrote its part of the checkpoint.
  for i in range(2):
    data = glob.glob(os.path.join(workdir, "checkpoints", str(saved), "state",
                                  f"ocdbt.process_{i}", "d", "*"))
    assert sum(os.path.getsize(f) for f in data) > 10_000, (i, data)

  # 2. Resumed, then both killed (kill -9) after the next checkpoint.
  pair = Pair(tmp_path, root, workdir, "killed")
  pair.wait_until(lambda: committed(workdir)[-1] > saved, "a new checkpoint")
  pair.kill()

  # 3. The same command runs to the end.
  pair = Pair(tmp_path, root, workdir, "last")
  assert pair.finish() == [0, 0], pair.stderr(0)[-2000:] + pair.stderr(1)[-2000:]
  assert os.path.isfile(os.path.join(workdir, "report", "results.json"))
  assert committed(workdir)[-1] == TOTAL

  # The one-process run on two devices (same global batch, same sharding of the step).
  one = str(tmp_path / "one")
  config = tiny_config(root, max_steps=TOTAL, checkpoint_every_steps=1)
  config.mesh.update(data=2, fsdp=True, fsdp_min_size=1024)
  config.eval.update(modes=("all",), trials=2, ranked_list_queries=2)
  with mock.patch.dict(os.environ, PIN_KERNELS):
    train.train_and_evaluate(config, one)
  want, got = _losses(one), _losses(workdir)
  assert sorted(want) == sorted(got) == list(range(1, TOTAL + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             **ROUNDING)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved_params(one)),
                          jax.tree.leaves(saved_params(workdir))):
    name = jax.tree_util.keystr(path)
    if "k_proj" in name and "bias" in name:
      # Attention is invariant to the key bias, so its gradient is rounding noise, which Adam
      # scales to about +-lr per step on either set-up: only the size of the moves compares.
      assert np.abs(b - a).max() <= 2.5 * TOTAL * config.optim.lr, name
      continue
    np.testing.assert_allclose(b, a, **ROUNDING, err_msg=name)
