"""The workdir a run leaves: cloud storage, honest checkpoints, resuming with the run's own config.

Each test names the failure it guards against (issue 16): a gs:// workdir turned into a local
folder, a checkpoint that cannot be restored, a resume with another config, non-finite parameters
in a checkpoint, a best checkpoint chosen on test identities.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from etils import epath

import fake_gcs
from data_pipelines import registry, sampler, synthetic
from eees_jax import checkpoints, experiment, inference, sharding, train
from _tiny_config import TINY_SET, tiny_config


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(root, **TINY_SET)
  return root


def small(root, **train_kw):
  """tiny_config on one device, with a short evaluation."""
  c = tiny_config(root, **train_kw)
  c.mesh.data = 1
  c.eval.update(trials=1, ranked_list_queries=0)
  return c


def _leaves(state):
  return jax.tree_util.tree_leaves_with_path(jax.device_get(state))


def _assert_same(a, b):
  for (path, x), y in zip(_leaves(a), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------
# A gs:// workdir.
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def gcs(monkeypatch):
  """gs:// served by tests/fake_gcs.py: orbax's array files over HTTP (TensorStore's gcs driver),
  its bucket checks through google-cloud-storage, every other file through etils.epath."""
  store = fake_gcs.Store()
  monkeypatch.setattr(fake_gcs.FakeGcsFileSystem, "store", store)
  with fake_gcs.serve(store) as url:
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "test")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    # epath -> fsspec -> the fake (TensorFlow's GCS client cannot be pointed elsewhere). epath
    # remembers its first answer to "use TensorFlow?" (EPATH_USE_TF), so it is asked anew here.
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    fake_gcs.register()
    yield store


def test_a_gs_workdir_trains_resumes_and_loads(root, gcs, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # a path library that does not know gs:// would write ./gs:/...
  workdir = "gs://bucket/runs/tiny"
  config = small(root, max_steps=2, checkpoint_every_steps=1)
  config.text.trainable = False  # frozen tower: its parameters and the feature cache are files too
  config.eval.ranked_list_queries = 2
  train.train_and_evaluate(config, workdir)
  capsys.readouterr()
  more = small(root, max_steps=3, checkpoint_every_steps=1)
  more.text.trainable = False
  more.eval.ranked_list_queries = 2
  train.train_and_evaluate(more, workdir)
  assert "Resumed from step 2 in gs://bucket/runs/tiny" in capsys.readouterr().out
  assert not os.listdir(tmp_path), "something was written to a local folder"
  names = {k.removeprefix("bucket/runs/tiny/") for k in gcs.keys("bucket/runs/tiny/")}
  for want in ("config.json", "report/results.json", "report/results.md", "report/cmc.png",
               "report/ranked_list.png", "checkpoints/3/state/_METADATA",
               "checkpoints/3/meta/metadata"):
    assert want in names, want
  for folder in ("text_tower/", "text_features/", "tensorboard/events.out.tfevents"):
    assert any(n.startswith(folder) and not n.endswith("/") for n in names), folder
  assert not any(n.startswith("checkpoints/1/") for n in names)  # keep_checkpoints=2: 2 and 3
  assert json.loads(gcs.get("bucket/runs/tiny/config.json")[0])["train"]["max_steps"] == 3
  model = inference.load(workdir)
  assert model.step == 3
  assert model.embed_text(["a person"]).shape == (1, model.joint_dim)


# ----------------------------------------------------------------------------------------------
# Checkpoints: corrupt files, a changed config, non-finite state, best vs latest.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
  """A finished run of 4 steps with checkpoints at steps 2 and 4, and a state to restore into."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  config = small(root, max_steps=4, checkpoint_every_steps=2)
  train.train_and_evaluate(config, workdir)
  exp, pretrained = experiment.build_experiment(config, workdir)
  template = jax.device_put(experiment.init_experiment_state(exp, pretrained),
                            sharding.replicated(exp.mesh))
  mngr = checkpoints.manager(workdir, config)
  steps = {s: checkpoints.restore(mngr, template, s)[0] for s in mngr.all_steps()}
  mngr.close()
  assert sorted(steps) == [2, 4]
  return dict(workdir=workdir, config=config, template=template, steps=steps)


def _largest(folder: str, pattern: str) -> str:
  found = sorted(epath.Path(folder).glob(pattern), key=lambda p: p.stat().length)
  assert found, f"no {pattern} in {folder}"
  return os.fspath(found[-1])


def _truncate(path: str) -> None:
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


CORRUPTIONS = {  # what a crash or a full disk leaves, each in the latest checkpoint (step 4)
    "array file": "state/ocdbt.process_0/d/*",  # the largest: the parameters' values
    "manifest": "state/manifest.ocdbt",
    "_METADATA": "state/_METADATA",
    "meta JSON": "meta/metadata",
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run, tmp_path, capfd, what):
  workdir = str(tmp_path / "w")
  shutil.copytree(run["workdir"], workdir)
  _truncate(_largest(os.path.join(workdir, "checkpoints", "4"), CORRUPTIONS[what]))
  mngr = checkpoints.manager(workdir, run["config"])
  try:
    state, meta = checkpoints.restore_latest(mngr, run["template"], workdir, run["config"])
    assert mngr.all_steps() == [2]
  finally:
    mngr.close()
  jax.effects_barrier()
  out, err = capfd.readouterr()
  assert "WARNING: checkpoint step 4 in" in out and "does not restore" in out, out
  assert "moved it to" in out and "trying the previous checkpoint" in out
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  assert meta["step"] == 2
  _assert_same(run["steps"][2], state)
  assert os.path.isdir(os.path.join(workdir, checkpoints.CORRUPT, "4"))


def test_no_restorable_checkpoint_stops_with_one_message(run, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(run["workdir"], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "2"))
  _truncate(_largest(os.path.join(workdir, "checkpoints", "4"), CORRUPTIONS["_METADATA"]))
  mngr = checkpoints.manager(workdir, run["config"])
  try:
    with pytest.raises(checkpoints.WorkdirError,
                       match=r"no checkpoint in .*checkpoints restores .*corrupt_checkpoints"):
      checkpoints.restore_latest(mngr, run["template"], workdir, run["config"])
  finally:
    mngr.close()


def test_resuming_with_another_config_is_refused_and_config_json_is_kept(run, root, tmp_path):
  workdir = str(tmp_path / "w")
  shutil.copytree(run["workdir"], workdir)
  before = open(os.path.join(workdir, "config.json")).read()
  other = small(root, max_steps=4, checkpoint_every_steps=2)
  other.model.vision.width = 16  # another architecture
  there = other.optim.lr           # the run's rate, whatever the config file's default is
  other.optim.lr = there / 2
  with pytest.raises(checkpoints.ResumeConfigError) as e:
    train.train_and_evaluate(other, workdir)
  message = str(e.value)
  assert "model.vision.width: 8 there, 16 now" in message
  assert f"optim.lr: {there} there, {there / 2} now" in message
  assert "Event loop is closed" not in message
  assert open(os.path.join(workdir, "config.json")).read() == before
  # Options that cannot change the steps already taken may differ: this resumes and finishes.
  neutral = small(root, max_steps=5, checkpoint_every_steps=5)
  neutral.train.log_every_steps = 3
  neutral.input.threads = 1
  neutral.eval.trials = 2
  train.train_and_evaluate(neutral, workdir)
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["max_steps"] == 5


def test_a_diverging_run_never_saves_non_finite_state(root, tmp_path):
  # Step 1 runs at lr 1 and is saved; a milestone multiplies the rate by 3e38 for step 2, and twice
  # that (the classifiers' rate) overflows float32: step 2's update makes parameters infinite
  # while its loss, computed before the update, is finite.
  config = small(root, max_steps=3, checkpoint_every_steps=1)
  steps_per_epoch = sampler.steps_per_epoch(registry.load_train_set(config.dataset),
                                            config.input.P, config.input.K)
  config.optim.update(lr=1.0, warmup_epochs=0, milestones=(1.5 / steps_per_epoch,), gamma=3e38)
  workdir = str(tmp_path / "w")
  with pytest.raises(checkpoints.NonFiniteStateError,
                     match=r"train state of step 2 has non-finite values in \d+ leaves .*not saved, "
                           r"and the latest checkpoint \(step 1\) is finite"):
    train.train_and_evaluate(config, workdir)
  mngr = checkpoints.manager(workdir, config)
  try:
    assert mngr.all_steps() == [1]
    exp, pretrained = experiment.build_experiment(config, workdir)
    state, _ = checkpoints.restore(mngr, experiment.init_experiment_state(exp, pretrained))
  finally:
    mngr.close()
  assert int(state.step) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(
      (state.params, state.batch_stats, state.opt_state))))


def test_the_best_checkpoint_is_chosen_on_val_ids_only(run, root, tmp_path):
  # Without a validation split: no metrics with any checkpoint, "best" is refused, the report says so.
  workdir = run["workdir"]
  mngr = checkpoints.open_read_only(workdir)
  try:
    assert all(not mngr.metrics(s) for s in mngr.all_steps())
  finally:
    mngr.close()
  with pytest.raises(inference.WorkdirError, match="without a validation split"):
    inference.load(workdir, "best")
  report = open(os.path.join(workdir, "report", "results.md")).read()
  assert "Checkpoints: the latest only" in report
  # With one (config.dataset.holdout): evaluations during training on the val ids pick the best.
  held = small(root, max_steps=-1, checkpoint_every_steps=0)
  held.dataset.holdout = True
  held.train.update(epochs=2, eval_every_epochs=1, keep_checkpoints=1)
  held_dir = str(tmp_path / "held")
  train.train_and_evaluate(held, held_dir)
  mngr = checkpoints.open_read_only(held_dir)
  try:
    steps = mngr.all_steps()
    evaluated = [s for s in steps if mngr.metrics(s)]
  finally:
    mngr.close()
  assert len(evaluated) == 1 and evaluated[0] < steps[-1], steps
  assert inference.load(held_dir, "best").step == evaluated[0]
  report = open(os.path.join(held_dir, "report", "results.md")).read()
  assert "held-out val ids" in report and "the best by held-out val mAP" in report
