"""inference.load(workdir): the evaluation's features from the workdir alone; steps; errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from data_pipelines import sysu_mm01, synthetic
from data_pipelines.images import read_image
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord
from eees_jax import checkpoints, embedding, inference, train

from _tiny_config import TINY_SET, tiny_config

# Float rounding: evaluation ran on 1 device, inference on 8 (different XLA partitioning); a wrong
# model or step is off by more than 1e-3 (checked below).
ROUNDING = dict(rtol=1e-4, atol=1e-5)
SENTENCES = ["a man in a red jacket carrying a backpack", "a woman with long hair",
             "someone walking", "a person in dark trousers and white shoes, holding a bag"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny EEES trained 3 steps from a tiny OpenAI-format CLIP (frozen text tower), and the
  features of some test images from the extractor of its final evaluation (data set and CLIP file
  at hand). Then the data set folder is renamed away and the CLIP file deleted."""
  import torch
  import _torch_refs
  base = tmp_path_factory.mktemp("inference")
  root = str(base / "synthetic")
  settings = dict(TINY_SET, num_test=5)
  synthetic.generate(root, **settings)
  clip = _torch_refs.tiny_clip((1, 1, 1, 1), 8, 64, embed_dim=32, context_length=16,
                               vocab_size=49408, text_width=64, text_layers=1, seed=1)
  ckpt = str(base / "tiny_rn.pt")
  torch.save(clip.state_dict(), ckpt)
  config = tiny_config(root, max_steps=3)
  config.dataset.generate.update(settings)
  if "pretrain" in config:
    config.pretrain.enabled = False  # the tiny OpenAI-format checkpoint below is the CLIP
  config.model.init.checkpoint = ckpt
  config.text.trainable = False
  config.eval.update(trials=1, ranked_list_queries=0)
  config.mesh.data = 1  # faster to compile; inference then runs on all 8 devices
  workdir = str(base / "run")
  # The evaluation extractor of the run's final evaluation, kept for the comparisons below.
  captured = []

  def spy(exp, state, **kwargs):
    captured.append((exp, state, make_extract(exp, state, **kwargs)))
    return captured[-1][2]

  make_extract = train.make_extract
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, "make_extract", spy)
    train.train_and_evaluate(config, workdir)
  exp, state, extract = captured[-1]
  assert int(state.step) == 3
  query = sysu_mm01.query_set(root, "all")[:5]
  gallery = sysu_mm01.gallery_set(root, "all", 0)[:7]
  records = query + gallery
  assert {r.modality for r in records} == {VISIBLE, INFRARED}
  want = extract(records)
  # The same images at another size, as PNG files, through the same extractor.
  big = base / "big"
  resized = []
  for r in records:
    image = np.asarray(Image.fromarray(read_image(os.path.join(root, r.path))).resize((27, 50)))
    resized.append(image)
    path = big / r.path.replace(".jpg", ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
  want_resized = extract([ImageRecord(r.path.replace(".jpg", ".png"), r.pid, r.camid, r.modality)
                          for r in records], str(big))
  moved = str(base / "moved_away")
  os.rename(root, moved)
  os.remove(ckpt)
  return dict(workdir=workdir, config=config, clip=clip, records=records, want=want,
              resized=resized, want_resized=want_resized, moved=moved, state=state,
              model=exp.model, mesh=exp.mesh)


@pytest.fixture(scope="module")
def loaded(trained):
  return inference.load(trained["workdir"])


def test_load_gives_the_evaluation_features_from_the_workdir_alone(trained, loaded):
  t, model = trained, loaded
  assert not os.path.exists(t["config"].dataset.root)
  assert not os.path.exists(t["config"].model.init.checkpoint)
  assert model.step == 3 and model.flip and (model.height, model.width) == (32, 16)
  records = t["records"]
  paths = [os.path.join(t["moved"], r.path) for r in records]
  modality = ["visible" if r.modality == VISIBLE else "infrared" for r in records]
  got = model.embed_images(paths, modality)
  assert got.shape == t["want"].shape == (len(records), model.feature_dim)
  np.testing.assert_allclose(got, t["want"], **ROUNDING)
  # Decoded arrays (PIL) give the same; so do arrays of another size, resized as evaluation does.
  arrays = [read_image(p) for p in paths]
  np.testing.assert_allclose(model.embed_images(arrays, [r.modality for r in records]), t["want"],
                             **ROUNDING)
  np.testing.assert_allclose(model.embed_images(np.stack(t["resized"]), modality),
                             t["want_resized"], **ROUNDING)
  # One modality for all: the infrared stem changes the visible images' features. Both stems start
  # as the checkpoint's stem and have taken 3 warm-up steps, so they differ little, but by far more
  # than rounding (ROUNDING's atol is 1e-5).
  visible = [p for p, r in zip(paths, records) if r.modality == VISIBLE]
  want_visible = t["want"][[r.modality == VISIBLE for r in records]]
  np.testing.assert_allclose(model.embed_images(visible, "visible"), want_visible,
                             **ROUNDING)
  assert np.abs(model.embed_images(visible, "infrared") - want_visible).max() > 1e-4
  # embed_joint is l2(v): the second block of the unflipped half of the test feature.
  half = model.feature_dim // 2
  f_dim = half - model.joint_dim
  np.testing.assert_allclose(model.embed_joint(paths, modality), t["want"][:, f_dim:half],
                             **ROUNDING)


def test_embed_text_is_openai_encode_text_normalised(trained, loaded):
  import torch
  from _torch_refs import simple_tokenizer
  model = loaded
  assert os.listdir(os.path.join(trained["workdir"], checkpoints.TEXT_TOWER))
  tok = simple_tokenizer().SimpleTokenizer()
  ids = np.zeros((len(SENTENCES), 16), np.int64)
  for row, s in enumerate(SENTENCES):
    seq = [tok.encoder["<|startoftext|>"]] + tok.encode(s)[:14] + [tok.encoder["<|endoftext|>"]]
    ids[row, :len(seq)] = seq
  with torch.no_grad():
    want = trained["clip"].encode_text(torch.from_numpy(ids)).numpy()
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  got = model.embed_text(SENTENCES)
  assert got.shape == (len(SENTENCES), model.joint_dim)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_step_selection_latest_best_and_number(trained, loaded, tmp_path):
  t = trained
  workdir = str(tmp_path / "steps")
  shutil.copytree(t["workdir"], workdir)
  # A run with a validation split (only those keep a best checkpoint, chosen on val metrics).
  held = t["config"].copy_and_resolve_references()
  held.dataset.holdout = True
  mngr = checkpoints.manager(workdir, held)
  _, meta = checkpoints.restore(mngr, t["state"])
  meta = dict(meta, config=json.loads(held.to_json_best_effort()))
  states = {}
  for step, scale, metrics in [(10, 1.5, {"mAP": 99.0}), (11, 0.5, {"mAP": 1.0}), (12, 2.0, None)]:
    states[step] = t["state"].replace(
        step=jax.numpy.asarray(step, jax.numpy.int32),
        params=jax.tree.map(lambda x, s=scale: x * s, t["state"].params))
    checkpoints.save(mngr, states[step], dict(meta, step=step), metrics)
  mngr.wait_until_finished()
  mngr.close()
  latest, best, eleven = (inference.load(workdir, s) for s in ("latest", "best", 11))
  assert (latest.step, best.step, eleven.step) == (12, 10, 11)
  assert len({latest.model_id, best.model_id, eleven.model_id, loaded.model_id}) == 4
  assert inference.load(t["workdir"], 3).model_id == loaded.model_id  # same step, same id
  # The best step's features are the evaluation extractor's on that step's parameters.
  paths = [os.path.join(t["moved"], r.path) for r in t["records"]]
  modality = [r.modality for r in t["records"]]
  s10 = states[10]
  extract = embedding.RecordExtractor(
      t["model"], {"params": s10.params["model"], "batch_stats": s10.batch_stats}, t["mesh"],
      images=t["moved"], height=32, width=16, batch_size=16, flip=True)
  np.testing.assert_allclose(best.embed_images(paths, modality), extract(t["records"]),
                             **ROUNDING)
  assert np.abs(latest.embed_images(paths, modality) - extract(t["records"])).max() > 1e-3


def test_clear_errors(trained, loaded, tmp_path):
  with pytest.raises(inference.WorkdirError, match="does not exist"):
    inference.load(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(inference.WorkdirError, match="holds no checkpoints"):
    inference.load(str(tmp_path / "empty"))
  with pytest.raises(inference.WorkdirError, match=r"no checkpoint of step 999; its steps are \["):
    inference.load(trained["workdir"], 999)
  with pytest.raises(inference.WorkdirError, match="expected 'latest', 'best' or a step number"):
    inference.load(trained["workdir"], "first")
  # A workdir written before checkpoints recorded the model, and without evaluation metrics.
  old = str(tmp_path / "old")
  mngr = checkpoints.manager(old, trained["config"])
  checkpoints.save(mngr, trained["state"], {"step": 3, "epoch": 1})
  mngr.wait_until_finished()
  mngr.close()
  with pytest.raises(inference.WorkdirError, match="written before checkpoints recorded the model"):
    inference.load(old)
  with pytest.raises(inference.WorkdirError, match="without a validation split"):
    inference.load(old, "best")
  # A damaged frozen text tower file is refused.
  copy = str(tmp_path / "copy")
  shutil.copytree(trained["workdir"], copy)
  folder = os.path.join(copy, checkpoints.TEXT_TOWER)
  (name,) = os.listdir(folder)
  data = bytearray(open(os.path.join(folder, name), "rb").read())
  data[-1] ^= 1
  open(os.path.join(folder, name), "wb").write(bytes(data))
  with pytest.raises(inference.WorkdirError, match="is corrupt"):
    inference.load(copy)
  # Bad inputs name what was expected.
  model = loaded
  with pytest.raises(ValueError, match="modality 'thermal'"):
    model.embed_images(np.zeros((1, 8, 4, 3), np.uint8), "thermal")
  with pytest.raises(ValueError, match="uint8 RGB array"):
    model.embed_images(np.zeros((1, 8, 4, 3), np.float32), "visible")
  assert model.embed_images([], "visible").shape == (0, model.feature_dim)
  with pytest.raises(DatasetError, match="missing.jpg: file not found"):
    model.embed_images([str(tmp_path / "missing.jpg")], "infrared")
