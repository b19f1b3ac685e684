"""eees_jax.pretrain_clip: the contrastive loss against a plain loop, a tiny deterministic pretraining
written in the format EEES starts from, and the reuse rules of `ensure_pretrained`."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic as synthetic_config
from data_pipelines.ops import CLIP_MEAN, CLIP_STD, normalize
from eees_jax import pretrain_clip
from eees_jax import weights as weights_lib
from eees_jax.models import eees as eees_lib
from eees_jax.models import towers


def test_clip_loss_equals_a_plain_loop():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  scale = math.log(7.0)
  unit = lambda v: v / np.linalg.norm(v)
  logits = [[7.0 * float(unit(img[i]) @ unit(txt[j])) for j in range(5)] for i in range(5)]

  def ce(row, target):
    return -row[target] + math.log(sum(math.exp(x) for x in row))

  rows = sum(ce(logits[i], i) for i in range(5)) / 5
  cols = sum(ce([logits[j][i] for j in range(5)], i) for i in range(5)) / 5
  right = sum(int(np.argmax(logits[i]) == i) for i in range(5)) / 5
  loss, acc = pretrain_clip.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale))
  np.testing.assert_allclose(float(loss), (rows + cols) / 2, rtol=1e-5)
  assert float(acc) == pytest.approx(right)


def test_attribute_loss_equals_a_plain_loop():
  rng = np.random.default_rng(4)
  sizes = (2, 3, 1)
  feats = rng.normal(size=(4, 5))
  head = {"w": rng.normal(size=(5, 6)), "b": rng.normal(size=6)}
  labels = np.array([[0, 2, 0], [1, 0, 0], [1, 1, 0], [0, 2, 0]], np.int32)
  total = 0.0
  for k, start in enumerate((0, 2, 5)):   # attribute k owns columns start .. start + sizes[k]
    for i in range(4):
      row = [sum(feats[i, d] * head["w"][d, start + c] for d in range(5)) + head["b"][start + c]
             for c in range(sizes[k])]
      total += (-row[labels[i, k]] + math.log(sum(math.exp(x) for x in row))) / 4
  got = pretrain_clip.attribute_loss(jnp.asarray(feats), jax.tree.map(jnp.asarray, head),
                                     jnp.asarray(labels), sizes)
  np.testing.assert_allclose(float(got), total / 3, rtol=1e-5)


def test_gem_pool_equals_a_plain_loop():
  x = np.random.default_rng(5).normal(size=(2, 3, 2, 4))   # negatives are clipped to eps
  got = np.asarray(eees_lib.gem_pool(jnp.asarray(x), 3.0))
  for b in range(2):
    for c in range(4):
      vals = [max(x[b, i, j, c], 1e-6) ** 3 for i in range(3) for j in range(2)]
      np.testing.assert_allclose(got[b, c], (sum(vals) / 6) ** (1 / 3), rtol=1e-5)


def test_augment_is_a_padded_crop_or_its_mirror():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (6, 8, 4, 3)), jnp.uint8)
  out = np.asarray(pretrain_clip.augment(jax.random.PRNGKey(3), images, pad=2, flip=0.5))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(6):   # every output is one of the 5 x 5 crops of the padded image, or a mirror
    crops = [padded[i, y:y + 8, x:x + 4] for y in range(5) for x in range(5)]
    assert any(np.array_equal(out[i], c) or np.array_equal(out[i], c[:, ::-1]) for c in crops)


def _tiny_config(tmp_path, steps=3):
  c = synthetic_config.get_config()
  c.model.init.checkpoint = str(tmp_path / "clip")
  c.input.update(height=32, width=16)
  c.model.vision.update(layers=(1, 1, 1, 1), width=8, output_dim=32, heads=2)
  c.model.text.update(width=32, heads=2, layers=1, embed_dim=32, context_length=56)
  c.pretrain.data.root = str(tmp_path / "pretrain_set")
  c.pretrain.data.generate.update(num_ids=6, images_per_camera=1, height=32, width=16,
                                  visible_only=False)
  # Plain CLIP pretraining (one shared stem, contrastive loss alone, both modalities); the
  # attribute term, the per-modality stems and the default's visible-only data have their own
  # tests below.
  c.pretrain.update(steps=steps, batch_size=8, attribute_weight=0.0, modality_stems=False,
                    visible_only=False)
  c.pretrain.input_size = ()   # at config.input's 32x16; test_input_size_* sets a size of its own
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  base = tmp_path_factory.mktemp("pretrain")
  config = _tiny_config(base)
  path = pretrain_clip.ensure_pretrained(config)
  return config, path, base


def test_pretraining_writes_what_eees_loads_and_is_deterministic(pretrained, tmp_path):
  config, path, _ = pretrained
  w = weights_lib.load_clip(path)
  assert w.vision_config["num_modalities"] == 2
  # The stem is stacked for both modalities: the infrared half equals the visible half.
  for leaf in jax.tree_util.tree_leaves(w.vision_params["stem"]):
    a, b = np.split(np.asarray(leaf), 2)
    np.testing.assert_array_equal(a, b)
  record = json.load(open(os.path.join(path, "config.json")))[pretrain_clip.RECORD_KEY]
  assert record["settings"] == pretrain_clip.settings(config)
  assert record["result"]["images"] > 0 and math.isfinite(record["result"]["final_loss"])
  # The same seed again (the data set is reused) gives the same parameters, bit for bit.
  again = pretrain_clip.pretrain(config, str(tmp_path / "again"))
  w2 = weights_lib.load_clip(str(tmp_path / "again"))
  assert again["final_loss"] == record["result"]["final_loss"]
  for a, b in zip(jax.tree_util.tree_leaves((w.vision_params, w.text_params)),
                  jax.tree_util.tree_leaves((w2.vision_params, w2.text_params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ensure_pretrained_reuses_a_match_and_refuses_anything_else(pretrained, tmp_path):
  config, path, base = pretrained
  stamp = os.path.getmtime(os.path.join(path, "config.json"))
  assert pretrain_clip.ensure_pretrained(config) == path        # reused, not rebuilt
  assert os.path.getmtime(os.path.join(path, "config.json")) == stamp
  other = _tiny_config(base, steps=4)
  with pytest.raises(pretrain_clip.PretrainError, match="differ in: steps"):
    pretrain_clip.ensure_pretrained(other)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  config2 = _tiny_config(base)
  config2.model.init.checkpoint = str(foreign)
  with pytest.raises(pretrain_clip.PretrainError, match="not written by eees_jax.pretrain_clip"):
    pretrain_clip.ensure_pretrained(config2)


def test_attribute_term_and_modality_stems_change_what_is_learnt(pretrained, tmp_path):
  _, _, base = pretrained   # the fixture's pretraining set is reused, not generated again
  results, towers_ = {}, {}
  for weight in (0.0, 1.0):
    config = _tiny_config(base)
    config.pretrain.update(attribute_weight=weight, modality_stems=True)
    out = str(tmp_path / f"clip_{weight}")
    results[weight] = pretrain_clip.pretrain(config, out)
    towers_[weight] = weights_lib.load_clip(out)
    assert pretrain_clip.recorded_settings(out) == pretrain_clip.settings(config)
  assert results[0.0]["final_attribute_loss"] == 0.0
  assert math.isfinite(results[1.0]["final_attribute_loss"]) and results[1.0]["final_attribute_loss"] > 0
  # One stem per modality, trained on its own images: the halves differ (no copy).
  stem = towers_[1.0].vision_params["stem"]
  assert any(not np.array_equal(*np.split(np.asarray(leaf), 2))
             for leaf in jax.tree_util.tree_leaves(stem))
  # The attribute term's gradient reaches the towers: same seed and data, other parameters.
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(towers_[0.0].vision_params),
      jax.tree_util.tree_leaves(towers_[1.0].vision_params)))
  assert "attribute_head" not in towers_[1.0].vision_params   # training only, never written
  config = _tiny_config(base)
  config.pretrain.attribute_weight = -1.0
  with pytest.raises(pretrain_clip.PretrainError, match="attribute_weight=-1.0 must be >= 0"):
    pretrain_clip.pretrain(config, str(tmp_path / "negative"))


def test_map_attribute_term_trains_the_last_map_and_is_recorded(pretrained, tmp_path):
  _, _, base = pretrained
  results, towers_ = {}, {}
  for weight in (0.0, 1.0):
    config = _tiny_config(base)
    config.pretrain.map_attribute_weight = weight
    out = str(tmp_path / f"clip_map_{weight}")
    results[weight] = pretrain_clip.pretrain(config, out)
    towers_[weight] = weights_lib.load_clip(out)
    # gem_p decides what the term reads, so it is part of the settings only when the term is on.
    assert ("gem_p" in pretrain_clip.recorded_settings(out)) == bool(weight)
  assert results[0.0]["final_map_attribute_loss"] == 0.0
  assert results[1.0]["final_map_attribute_loss"] > 0
  assert set(towers_[1.0].vision_params) == set(towers_[0.0].vision_params)  # head not written
  config = _tiny_config(base)
  config.pretrain.map_attribute_weight = -2.0
  with pytest.raises(pretrain_clip.PretrainError, match="map_attribute_weight=-2.0 must be >= 0"):
    pretrain_clip.pretrain(config, str(tmp_path / "negative"))
  config = _tiny_config(base)
  config.pretrain.map_attribute_weight = 1.0
  config.model.vision.kind = "vit"
  with pytest.raises(pretrain_clip.PretrainError, match="needs a ResNet image tower"):
    pretrain_clip.pretrain(config, str(tmp_path / "vit"))


def test_visible_only_drops_every_infrared_image_and_is_recorded_only_when_on(pretrained, tmp_path):
  _, _, base = pretrained
  config = _tiny_config(base)
  *_, modality = pretrain_clip._pretraining_data(config)
  config.pretrain.visible_only = True
  images, tokens, labels, _, vis_modality = pretrain_clip._pretraining_data(config)
  # Counted on disk, SYSU-MM01's layout: cameras 3 and 6 are the infrared ones.
  def files(cams):
    return sum(len(names) for cam in cams
               for _, _, names in os.walk(os.path.join(base, "pretrain_set", f"cam{cam}")))
  assert files((3, 6)) > 0 and (modality == 1).sum() == files((3, 6))
  assert len(images) == len(tokens) == len(labels) == files((1, 2, 4, 5))
  assert (vis_modality == 0).all()
  assert "visible_only" not in pretrain_clip.settings(_tiny_config(base))   # older checkpoints
  assert pretrain_clip.settings(config)["visible_only"] is True
  config.pretrain.modality_stems = True
  with pytest.raises(pretrain_clip.PretrainError, match="visible_only=True leaves the infrared stem"):
    pretrain_clip.pretrain(config, str(tmp_path / "both"))
  # A pretraining set generated without infrared images (the default's) gives the same arrays.
  config.pretrain.modality_stems = False
  config.pretrain.data.root = str(tmp_path / "visible_set")
  config.pretrain.data.generate.visible_only = True
  assert not os.path.exists(tmp_path / "visible_set" / "cam3")
  got = pretrain_clip._pretraining_data(config)
  assert os.path.isdir(tmp_path / "visible_set" / "cam1")
  assert not os.path.exists(tmp_path / "visible_set" / "cam3")
  for a, b in zip(got, (images, tokens, labels, got[3], vis_modality)):
    np.testing.assert_array_equal(a, b)
  config.pretrain.visible_only = False   # ... which a pretraining on both modalities refuses
  with pytest.raises(pretrain_clip.PretrainError, match="generate.visible_only=True generates no"):
    pretrain_clip.pretrain(config, str(tmp_path / "mixed"))


def test_input_size_sets_the_pretraining_resolution_alone(pretrained, tmp_path):
  _, path, base = pretrained   # pretrained at config.input's 32x16 (input_size empty)
  config = _tiny_config(base, steps=2)
  config.pretrain.input_size = (48, 24)
  images, *_ = pretrain_clip._pretraining_data(config)
  assert images.shape[1:] == (48, 24, 3)
  settings = pretrain_clip.settings(config)
  assert settings["input"] == [48, 24] and "input_size" not in settings
  out = str(tmp_path / "clip_48x24")
  pretrain_clip.pretrain(config, out)
  assert pretrain_clip.recorded_settings(out)["input"] == [48, 24]
  # The tower pretrained at 48x24 runs at config.input's 32x16, as EEES will run it.
  w = weights_lib.load_clip(out)
  vision = towers.build_vision_tower(config.model.vision.to_dict())   # EEES's: two stems
  x = normalize(jnp.asarray(images[:2]), CLIP_MEAN, CLIP_STD)
  x = jax.image.resize(x, (2, 32, 16, 3), "bilinear")
  feats = vision.apply(w.vision_variables(), x, jnp.array([0, 1]), train=False)["pooled"]
  assert feats.shape == (2, 32) and np.isfinite(np.asarray(feats)).all()
  # What is compared before reuse is the size pretrained at, however it is set: the fixture's
  # checkpoint (32x16 from config.input) is reused under input_size=(32, 16) and another
  # config.input, and refused under input_size=(48, 24).
  config = _tiny_config(base)
  config.model.init.checkpoint = path
  config.pretrain.input_size = (32, 16)
  config.input.update(height=64, width=32)
  assert pretrain_clip.ensure_pretrained(config) == path
  config.pretrain.input_size = (48, 24)
  with pytest.raises(pretrain_clip.PretrainError, match="differ in: input"):
    pretrain_clip.ensure_pretrained(config)
  for bad in ((48,), (48, 0), (48.0, 24), (True, 24)):
    config.pretrain.input_size = bad
    with pytest.raises(pretrain_clip.PretrainError, match=r"config.pretrain.input_size=.* must be"):
      pretrain_clip.ensure_pretrained(config)


def test_map_attribute_term_gradient_reaches_the_tower(tmp_path):
  """With plain SGD at rate 1 the step's update is minus the gradient, so the update with the map
  term minus the update without it is minus weight times the gradient of the term alone, computed
  here from the tower's map, GeM and the head directly."""
  config = _tiny_config(tmp_path)
  vision = towers.build_vision_tower(pretrain_clip._vision_architecture(config))
  text = towers.build_text_tower(config.model.text.to_dict())
  rng = np.random.default_rng(6)
  sizes = (2, 3)
  images = jnp.asarray(rng.integers(0, 256, (4, 32, 16, 3)), jnp.uint8)
  tokens = jnp.asarray(rng.integers(1, 100, (4, 56)), jnp.int32)
  labels = jnp.asarray([[0, 2], [1, 0], [1, 1], [0, 1]], jnp.int32)
  variables = vision.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 16, 3)), None, train=False)
  head = {"w": jnp.asarray(rng.normal(size=(32 * 8, 5)), jnp.float32), "b": jnp.zeros((5,))}
  params = {"vision": variables["params"],
            "text": text.init(jax.random.PRNGKey(1), tokens)["params"],
            "logit_scale": jnp.asarray(2.0), "map_attribute_head": head}
  tx = optax.sgd(1.0)
  state = pretrain_clip.State(step=jnp.zeros((), jnp.int32), params=params,
                              batch_stats=variables["batch_stats"], opt_state=tx.init(params))
  step = functools.partial(pretrain_clip.train_step, state, images, tokens, labels,
                           jnp.zeros((4,), jnp.int32), jax.random.PRNGKey(2), vision=vision,
                           text=text, tx=tx, pad=0, flip=0.0, sizes=sizes)
  without, _ = step(map_attribute_weight=0.0)
  with_term, metrics = step(map_attribute_weight=3.0, gem_p=2.0)

  x = normalize(images, CLIP_MEAN, CLIP_STD)   # pad 0, flip 0: the augmentation is the identity

  def term(vision_params):
    out, _ = vision.apply({"params": vision_params, "batch_stats": variables["batch_stats"]}, x,
                          None, train=True, mutable=["batch_stats"])
    # The pooling written out here, not eees_lib.gem_pool: an independent path to the same term.
    pooled = jnp.mean(jnp.maximum(out["map"], 1e-6) ** 2, axis=(1, 2)) ** 0.5
    return pretrain_clip.attribute_loss(pooled, head, labels, sizes)

  value, grad = jax.value_and_grad(term)(params["vision"])
  np.testing.assert_allclose(float(metrics["map_attributes"]), float(value), rtol=1e-5)
  for name in ("layer4_0", "stem"):
    got = jax.tree.map(lambda a, b: a - b, with_term.params["vision"][name],
                       without.params["vision"][name])
    want = jax.tree.map(lambda g: -3.0 * g, grad[name])
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      # A difference of two updates: float rounding relative to the leaf's scale (gradients up
      # to ~30 here, differences up to 3e-5 where the two programs fuse differently).
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3,
                                 atol=1e-5 * (1 + np.abs(np.asarray(w)).max()))
    assert max(float(jnp.abs(w).max()) for w in jax.tree_util.tree_leaves(want)) > 1e-4
