"""Checkpoint reading, conversion, saving and partial loading (eees_jax.weights, convert_clip.py)."""
import os

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import traverse_util

from eees_jax import convert_clip
from eees_jax import weights as W
from eees_jax.models import towers
from _torch_refs import clip_model, randomize_, tiny_clip


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def assert_same_weights(a: W.CLIPWeights, b: W.CLIPWeights):
  assert a.vision_config == b.vision_config and a.text_config == b.text_config
  assert a.logit_scale == pytest.approx(b.logit_scale)
  for x, y in [(a.vision_variables(), b.vision_variables()), (a.text_variables(),
                                                              b.text_variables())]:
    fx, fy = flat(x), flat(y)
    assert fx.keys() == fy.keys()
    for k in fx:
      np.testing.assert_array_equal(np.asarray(fx[k]), np.asarray(fy[k]), err_msg=k)


@pytest.fixture(scope="module")
def rn():
  model = tiny_clip((1, 1, 1, 1), 16, 64)
  return model, {k: v.numpy() for k, v in model.state_dict().items()}


def test_torch_pt_and_safetensors_files(rn, tmp_path):
  import safetensors.numpy
  model, sd = rn
  direct = W.convert_openai_state_dict(sd)
  torch.save(model.state_dict(), tmp_path / "rn.pt")
  safetensors.numpy.save_file(sd, str(tmp_path / "rn.safetensors"))
  for name in ("rn.pt", "rn.safetensors"):
    assert_same_weights(W.load_clip(str(tmp_path / name)), direct)
  assert direct.vision_config["num_modalities"] == 2
  assert direct.logit_scale == pytest.approx(float(model.logit_scale.detach()))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_archive_like_openai_downloads(tmp_path):
  """OpenAI's RN50.pt is a traced, half-precision TorchScript archive; torch refuses to load it
  weights-only, and our restricted reader gets the same tensors as torch.jit's state_dict()."""
  model = tiny_clip((1, 1, 1, 1), 16, 64, seed=4)
  clip_model().convert_weights(model)
  tokens = torch.zeros(1, 16, dtype=torch.long)
  tokens[0, :3] = torch.tensor([98, 5, 99])
  traced = torch.jit.trace(model, (torch.randn(1, 3, 64, 64).half(), tokens), check_trace=False)
  traced.save(str(tmp_path / "RN.pt"))
  tensors = W.read_state_dict(str(tmp_path / "RN.pt"))
  ref = traced.state_dict()
  assert tensors.keys() == ref.keys()
  for k, v in ref.items():
    assert tensors[k].dtype == v.numpy().dtype
    np.testing.assert_array_equal(tensors[k], v.numpy(), err_msg=k)
  loaded = W.load_clip(str(tmp_path / "RN.pt"))
  expected = W.convert_openai_state_dict({k: v.float().numpy() for k, v in ref.items()})
  assert_same_weights(loaded, expected)


@pytest.mark.parametrize("eos", [98, 2])
def test_hugging_face_checkpoint_parity(tmp_path, eos):
  """A tiny random HF CLIPModel: eos 98 (first-occurrence rule) and 2 (legacy argmax rule)."""
  import transformers
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                       layer_norm_eps=1e-6, bos_token_id=97, eos_token_id=eos, pad_token_id=0),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=4),
      projection_dim=24)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  randomize_(model, seed=1)
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  weights = W.load_clip(str(tmp_path))
  assert weights.text_config["eos_token_id"] == (None if eos == 2 else 98)
  assert weights.text_config["act"] == "gelu" and weights.vision_config["heads"] == 4

  rng = np.random.RandomState(0)
  pixels = rng.randn(3, 3, 32, 32).astype(np.float32)
  ids = rng.randint(1, 97, size=(3, 16))
  ids[:, 0] = 97
  for row, p in enumerate([4, 9, 15]):
    ids[row, p] = 99 if eos == 2 else 98
    ids[row, p + 1:] = 0
  if eos == 98:
    ids[0, 1] = 99  # A larger id before the end of text: only the eos rule finds position 4.
  with torch.no_grad():
    ref_img = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
    ref_txt = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
  vision = towers.build_vision_tower(weights.vision_config)
  img = jax.jit(vision.apply)(weights.vision_variables(), pixels.transpose(0, 2, 3, 1),
                              jnp.array([0, 1, 1]))["pooled"]
  txt = jax.jit(towers.build_text_tower(weights.text_config).apply)(weights.text_variables(), ids)
  assert rel_err(img, ref_img.numpy()) < 1e-4
  assert rel_err(txt, ref_txt.numpy()) < 1e-4
  assert weights.logit_scale == pytest.approx(float(model.logit_scale.detach()))
  if eos == 98:  # ViT round trip through the converted format (no batch statistics).
    W.save_converted(weights, str(tmp_path / "converted"))
    reloaded = W.load_clip(str(tmp_path / "converted"))
    assert reloaded.vision_batch_stats is None
    assert_same_weights(reloaded, weights)


def test_bad_checkpoints_name_keys_and_paths(rn, tmp_path):
  _, sd = rn
  with pytest.raises(W.CheckpointError, match="nowhere.pt"):
    W.load_clip(str(tmp_path / "nowhere.pt"))
  bad = dict(sd)
  del bad["visual.layer2.0.bn2.running_var"]
  bad["visual.extra.weight"] = np.zeros(3, np.float32)
  bad["visual.layer3.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(W.CheckpointError) as err:
    W.convert_openai_state_dict(bad, origin="bad.pt")
  msg = str(err.value)
  for text in ("bad.pt", "missing keys (1): visual.layer2.0.bn2.running_var",
               "unknown keys (1): visual.extra.weight",
               "visual.layer3.0.conv2.weight (64, 64, 1, 1) (expected (64, 64, 3, 3))"):
    assert text in msg
  with pytest.raises(W.CheckpointError, match="not an OpenAI CLIP state dict"):
    W.convert_openai_state_dict({"foo": np.zeros(1)})
  no_text = {k: v for k, v in sd.items() if k.startswith("visual.")}
  with pytest.raises(W.CheckpointError, match="'ln_final.weight'"):
    W.convert_openai_state_dict(no_text)
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(W.CheckpointError, match="junk.pt"):
    W.load_clip(str(tmp_path / "junk.pt"))
  os.makedirs(tmp_path / "empty_folder")
  with pytest.raises(W.CheckpointError, match="config.json"):
    W.load_clip(str(tmp_path / "empty_folder"))


def test_files_that_are_not_checkpoints_say_what_they_are_not(rn, tmp_path, capsys):
  """Issue 16: "torch.load(weights_only=True) failed: 105" told the user nothing."""
  import zipfile
  junk = tmp_path / "x.pt"
  junk.write_bytes(b"<html>" + b"." * 99)  # e.g. a saved error page instead of the download
  with pytest.raises(W.CheckpointError) as err:
    W.load_clip(str(junk))
  msg = str(err.value)
  assert f"{junk} is not a PyTorch checkpoint (neither a zip archive nor a pickle" in msg
  for expected in ("RN50.pt", "torch.save state dict", ".safetensors file",
                   "Hugging Face CLIP folder"):
    assert expected in msg
  assert "torch.load" not in msg
  assert convert_clip.main([str(junk), str(tmp_path / "out")]) == 1
  printed = capsys.readouterr().err
  assert "x.pt is not a PyTorch checkpoint" in printed and "Traceback" not in printed
  with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
    z.writestr("readme.txt", "hello")
  with pytest.raises(W.CheckpointError, match=r"other.pt is a zip archive but not a PyTorch "
                     r"checkpoint \(it holds no <name>/data.pkl\); expected OpenAI's RN50.pt"):
    W.load_clip(str(tmp_path / "other.pt"))
  with pytest.raises(W.CheckpointError, match="folder without config.json.*Hugging Face CLIP"):
    W.load_clip(str(tmp_path))
  # A safetensors file is recognised by its header, not by its name.
  import safetensors.numpy
  _, sd = rn
  safetensors.numpy.save_file(sd, str(tmp_path / "renamed.pt"))
  assert_same_weights(W.load_clip(str(tmp_path / "renamed.pt")), W.convert_openai_state_dict(sd))


def test_save_load_converted_and_cli(rn, tmp_path, capsys):
  model, sd = rn
  torch.save(model.state_dict(), tmp_path / "rn.pt")
  out = tmp_path / "converted"
  assert convert_clip.main([str(tmp_path / "rn.pt"), str(out)]) == 0
  printed = capsys.readouterr().out
  assert "ModifiedResNet layers=(1, 1, 1, 1) width=16" in printed
  assert "vision parameters:" in printed and "text parameters:" in printed
  direct = W.convert_openai_state_dict(sd)
  assert_same_weights(W.load_converted(str(out)), direct)
  assert_same_weights(W.load_clip(str(out)), direct)
  assert convert_clip.main([str(tmp_path / "rn.pt"), str(out)]) == 1  # Refuses to overwrite.
  assert "not empty" in capsys.readouterr().err


def test_merge_params(rn):
  _, sd = rn
  weights = W.convert_openai_state_dict(sd)
  fresh = jax.tree.map(np.zeros_like, weights.vision_params)
  target = {"backbone": fresh, "head": {"w": np.ones((3, 2), np.float32)}}
  merged, report = W.merge_params(target, weights.vision_params, [r"^stem/", r"^layer1_"],
                                  target_prefix="backbone/", return_report=True)
  fm, fs = flat(merged), flat(weights.vision_params)
  for k, v in fs.items():
    if k.startswith(("stem/", "layer1_")):
      np.testing.assert_array_equal(fm["backbone/" + k], v)
      assert "backbone/" + k in report.loaded
    else:
      assert not np.asarray(fm["backbone/" + k]).any() and k in report.skipped
  assert "backbone/attnpool/c_proj/kernel" in report.fresh
  np.testing.assert_array_equal(fm["head/w"], 1.0)

  with pytest.raises(ValueError, match=r"regexes selecting no source leaf: \['\^nothing'\]"):
    W.merge_params(target, weights.vision_params, ["^nothing"], target_prefix="backbone/")
  smaller = jax.tree.map(lambda a: a[:1] if a.ndim else a, weights.vision_params)
  with pytest.raises(ValueError, match="shape mismatches .*backbone/stem/bn1/bias"):
    W.merge_params(target, smaller, ["stem/bn1"], target_prefix="backbone/")
  with pytest.raises(ValueError, match="missing from the target .*attnpool"):
    W.merge_params(target, weights.vision_params, ["attnpool"])


def test_build_tower_rejects_unknown_option(rn):
  _, sd = rn
  weights = W.convert_openai_state_dict(sd)
  with pytest.raises(ValueError, match="no option.*last_strid"):
    towers.build_vision_tower(weights.vision_config, last_strid=1)
  assert towers.build_vision_tower(weights.vision_config, last_stride=1).last_stride == 1
