"""The trainer: the sharded step equals the single-device step, FSDP, a diverging run, pretrained
CLIP initialisation. Kill-and-resume and the command line under signals: tests/test_preemption.py."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from data_pipelines import input_pipeline, synthetic
from data_pipelines import datasets, descriptions as descriptions_lib
from eees_jax import checkpoints, experiment, sharding, train
from _tiny_config import TINY_SET, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(root, **TINY_SET)
  return root


def _first_batch(exp):
  it = input_pipeline.train_dataset(
      exp.train_set, P=exp.config.input.P, K=exp.config.input.K, height=exp.config.input.height,
      width=exp.config.input.width, seed=exp.config.seed, start_step=0, num_steps=1,
      process_index=0, process_count=1, aug=exp.config.input.aug, threads=None,
      cache_decoded=False)
  return next(it)


def _one_step(config, workdir, num_devices):
  config.mesh.data = num_devices
  exp, pretrained = experiment.build_experiment(config, workdir)
  assert exp.mesh.devices.size == num_devices
  rep = sharding.replicated(exp.mesh)
  state = jax.device_put(experiment.init_experiment_state(exp, pretrained), rep)
  text = {k: jax.device_put(v, rep) for k, v in exp.text_arrays.items()}
  step = jax.jit(functools.partial(train.train_step, model=exp.model, text_model=exp.text_model,
                                   tx=exp.tx, loss_cfg=config.loss),
                 in_shardings=(rep, sharding.batch_sharded(exp.mesh), rep), out_shardings=(rep, rep))
  batch = sharding.host_batch_to_global(_first_batch(exp), exp.mesh)
  assert len(batch["images"].sharding.device_set) == num_devices
  state, metrics = step(state, batch, text)
  return jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def one_device_step(tiny_root, tmp_path_factory):
  """The reference: one step of the tiny config on a 1-device mesh."""
  return _one_step(tiny_config(tiny_root), str(tmp_path_factory.mktemp("one_device")), 1)


def _assert_same_step(ref, got, optim_cfg) -> None:
  """Metrics, parameters and BatchNorm statistics of two one-step results agree."""
  (s1, m1), (s8, m8) = ref, got
  lr0 = optim_cfg.lr * optim_cfg.warmup_from  # the first step's rate (linear warm-up)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=2e-4, atol=1e-5, err_msg=k)
  flat8 = dict(jax.tree_util.tree_leaves_with_path(s8.params))
  for path, leaf in jax.tree_util.tree_leaves_with_path(s1.params):
    if "k_proj" in str(path) and "bias" in str(path):
      # Attention is invariant to the key bias, so its gradient is rounding noise, which Adam
      # scales to about +-lr on either mesh: only the size of that move is comparable.
      assert np.abs(flat8[path] - leaf).max() <= 2.5 * lr0, str(path)
      continue
    np.testing.assert_allclose(flat8[path], leaf, rtol=2e-3, atol=2e-5, err_msg=str(path))
  # BatchNorm running statistics are over the global batch on both meshes.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1.batch_stats),
                          jax.tree_util.tree_leaves(s8.batch_stats)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5, err_msg=str(path))


def test_sharded_step_equals_single_device(tiny_root, tmp_path, one_device_step):
  assert jax.device_count() == 8, "tests/conftest.py asks XLA for 8 CPU devices"
  s1, m1 = one_device_step
  s8, m8 = _one_step(tiny_config(tiny_root), str(tmp_path / "b"), 8)
  assert m1["loss/total"] > 0
  _assert_same_step((s1, m1), (s8, m8), tiny_config(tiny_root).optim)
  # The frozen BNNeck bias did not move; the classifiers did.
  np.testing.assert_array_equal(s1.params["model"]["bnneck_f"]["bias"], 0.0)
  assert np.abs(s1.params["model"]["classifier_f"]["kernel"]).sum() > 0


def test_non_finite_loss_stops_with_the_term_and_step(tiny_root, tmp_path):
  config = tiny_config(tiny_root, max_steps=3)
  config.optim.update(lr=1e30, warmup_epochs=0)  # the first update destroys the parameters
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite value of .*loss/\w+.* at step 2"):
    train.train_and_evaluate(config, str(tmp_path / "nan"))
  ckpts = tmp_path / "nan" / "checkpoints"
  assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


def test_pretrained_clip_initialises_both_towers(tiny_root, tmp_path):
  """An OpenAI-format checkpoint sets the EEES encoder (both stems) and the frozen text features."""
  import torch
  import _torch_refs
  clip = _torch_refs.tiny_clip((1, 1, 1, 1), 8, 64, embed_dim=32, context_length=16,
                               vocab_size=49408, text_width=64, text_layers=1, seed=1)
  ckpt = str(tmp_path / "tiny_rn.pt")
  torch.save(clip.state_dict(), ckpt)
  config = tiny_config(tiny_root)
  config.model.init.checkpoint = ckpt
  config.text.trainable = False
  exp, pretrained = experiment.build_experiment(config, str(tmp_path / "w"))
  state = experiment.init_experiment_state(exp, pretrained)
  enc = state.params["model"]["encoder"]
  # Both stems are CLIP's stem (torch OIHW -> flax HWIO).
  ref = clip.visual.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
  for m in range(2):
    np.testing.assert_allclose(enc["stem"]["conv1"]["kernel"][m], ref, rtol=1e-6)
  # Frozen description features equal OpenAI's encode_text of the same tokens.
  from eees_jax.models import tokenizer as tokenizer_lib
  texts = descriptions_lib.load_descriptions(
      datasets.descriptions_path(config.dataset), exp.train_set.records, field="auto")
  toks = tokenizer_lib.build_tokenizer("clip", context_length=16).tokenize(texts[:4])
  with torch.no_grad():
    want = clip.encode_text(torch.from_numpy(toks.astype(np.int64))).numpy()
  got = exp.text_arrays["features"][exp.text_arrays["index"][:4]]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Fully-sharded data parallel (config.mesh.fsdp).
# ----------------------------------------------------------------------------------------------

def test_state_shardings_splits_large_leaves_on_their_largest_divisible_dim():
  mesh = sharding.make_mesh(8)
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  state = {
      "params": {"conv": s(3, 3, 16, 64), "dense": s(64, 24), "tie": s(32, 32), "odd": s(9, 7, 5),
                 "bias": s(64), "small": s(4, 8)},
      "opt_state": ({"mu": {"dense": s(64, 24)}, "count": s()},),
      "batch_stats": {"mean": s(64, 64)},
      "step": s(),
      "rng": s(4, 2),
  }
  got = sharding.state_shardings(state, mesh, fsdp=True, min_size=64)
  data = sharding.DATA_AXIS
  # Hand-derived: the largest dimension that 8 divides; the later one on ties; none -> replicated.
  assert got["params"]["conv"].spec == P(None, None, None, data)    # 64 > 16; 3 does not divide
  assert got["params"]["dense"].spec == P(data)                     # 64 > 24 (both divide)
  assert got["params"]["tie"].spec == P(None, data)                 # tie: the later dimension
  assert got["params"]["odd"].spec == P()                           # 315 elements, nothing divides
  assert got["params"]["bias"].spec == P(data)                      # 64 elements = min_size
  assert got["params"]["small"].spec == P()                         # 32 elements < min_size
  assert got["opt_state"][0]["mu"]["dense"].spec == P(data)         # Adam moment = its parameter
  assert got["opt_state"][0]["count"].spec == P()
  assert got["batch_stats"]["mean"].spec == P()                     # statistics stay replicated
  assert got["step"].spec == P() and got["rng"].spec == P()
  assert all(x.mesh is mesh for x in jax.tree.leaves(got))
  # FSDP off: every leaf replicated, same tree.
  off = sharding.state_shardings(state, mesh, fsdp=False, min_size=64)
  assert jax.tree.structure(off) == jax.tree.structure(state)
  assert all(x.spec == P() for x in jax.tree.leaves(off))
  # A 1-device mesh has nothing to split.
  one = sharding.state_shardings(state, sharding.make_mesh(1), fsdp=True, min_size=0)
  assert all(x.spec == P() for x in jax.tree.leaves(one))
  with pytest.raises(ValueError, match="fsdp_min_size"):
    sharding.state_shardings(state, mesh, fsdp=True, min_size=-1)


FSDP_MIN = 1024  # small enough that the tiny model's larger kernels and embeddings really are split


def _one_fsdp_step(config, workdir):
  """_one_step on 8 devices with the state placed and jitted by state_shardings(fsdp=True)."""
  config.mesh.update(data=8, fsdp=True, fsdp_min_size=FSDP_MIN)
  exp, pretrained = experiment.build_experiment(config, workdir)
  rep = sharding.replicated(exp.mesh)
  state = experiment.init_experiment_state(exp, pretrained)
  state_sh = sharding.state_shardings(state, exp.mesh, True, FSDP_MIN)
  state = jax.device_put(state, state_sh)
  text = {k: jax.device_put(v, rep) for k, v in exp.text_arrays.items()}
  step = jax.jit(functools.partial(train.train_step, model=exp.model, text_model=exp.text_model,
                                   tx=exp.tx, loss_cfg=config.loss),
                 in_shardings=(state_sh, sharding.batch_sharded(exp.mesh), rep),
                 out_shardings=(state_sh, rep))
  state, metrics = step(state, sharding.host_batch_to_global(_first_batch(exp), exp.mesh), text)
  return state, jax.device_get(metrics)


def test_fsdp_step_equals_single_device(tiny_root, tmp_path, one_device_step):
  state, m8 = _one_fsdp_step(tiny_config(tiny_root), str(tmp_path / "b"))
  # Some parameters, and their Adam moments, really are split: each device holds 1/8 of them.
  split = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(state.params)
           if not x.sharding.is_fully_replicated]
  assert split, "no parameter leaf was sharded; lower FSDP_MIN"
  for path, x in split:
    assert x.addressable_shards[0].data.size * 8 == x.size, str(path)
  moments = [x for x in jax.tree.leaves(state.opt_state) if not x.sharding.is_fully_replicated]
  assert len(moments) == 2 * len(split)  # Adam's mu and nu of every split parameter
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.batch_stats))
  _assert_same_step(one_device_step, (jax.device_get(state), m8), tiny_config(tiny_root).optim)


def test_fsdp_checkpoint_restores_replicated_and_resumes(tiny_root, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = tiny_config(tiny_root, max_steps=2)
  config.mesh.update(fsdp=True, fsdp_min_size=FSDP_MIN)
  train.train_and_evaluate(config, workdir)
  # The FSDP checkpoint restores into either placement, with the same values and features.
  exp, pretrained = experiment.build_experiment(config, workdir)
  fresh = experiment.init_experiment_state(exp, pretrained)
  restored, feats = {}, {}
  for fsdp in (True, False):
    state = jax.device_put(fresh, sharding.state_shardings(fresh, exp.mesh, fsdp, FSDP_MIN))
    mngr = checkpoints.manager(workdir, config)
    state, meta = checkpoints.restore(mngr, state)
    mngr.close()
    assert meta["step"] == 2 and int(state.step) == 2
    replicated = [x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params)]
    assert all(replicated) != fsdp
    feats[fsdp] = train.make_extract(exp, state)(exp.train_set.records[:16])
    restored[fsdp] = jax.device_get(state)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(fresh.params)),
                                                   jax.tree.leaves(restored[True].params))]
  assert any(moved), "the restored parameters are the fresh ones"
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored[True]),
                          jax.tree.leaves(restored[False])):
    np.testing.assert_array_equal(b, a, err_msg=str(path))
  assert feats[True].shape[0] == 16 and np.abs(feats[True]).sum() > 0
  np.testing.assert_allclose(feats[False], feats[True], rtol=1e-5, atol=1e-6)
  # A run without FSDP picks the checkpoint up and continues.
  capsys.readouterr()
  train.train_and_evaluate(tiny_config(tiny_root, max_steps=3), workdir)
  assert "Resumed from step 2" in capsys.readouterr().out
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  assert steps[-1] == 3


def test_an_unreadable_test_image_stops_the_run_before_training(tiny_root, tmp_path):
  import shutil
  from data_pipelines import registry
  from data_pipelines.records import DatasetError
  root = tmp_path / "set"
  shutil.copytree(tiny_root, root)
  config = tiny_config(str(root), max_steps=3)
  bad = registry.test_records(config)[3].path
  data = (root / bad).read_bytes()
  (root / bad).write_bytes(data[: len(data) // 3])  # a truncated JPEG
  with pytest.raises(DatasetError, match=os.path.basename(bad)):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the first step
