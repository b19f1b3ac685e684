"""bench.attribute_probe: attribute targets from synthetic.json; a run end to end on a tiny set."""
import json

import pytest

from bench import attribute_probe
from data_pipelines import synthetic
from data_pipelines.synthetic.identities import SHARED_ATTRIBUTES
from _tiny_config import TINY_SET


def test_attribute_table_indexes_sorted_values(tmp_path):
  people = []
  people_attributes = [("woman", "none"), ("man", "handbag"), ("man", "backpack")]
  for pid, (gender, bag) in enumerate(people_attributes, 1):
    person = {a: "x" for a in SHARED_ATTRIBUTES}
    person.update(pid=pid, gender=gender, bag=bag)
    people.append(person)
  (tmp_path / "synthetic.json").write_text(json.dumps({"identities": people}))
  table, values = attribute_probe.attribute_table(str(tmp_path))
  g, b = SHARED_ATTRIBUTES.index("gender"), SHARED_ATTRIBUTES.index("bag")
  assert values[g] == ["man", "woman"] and values[b] == ["backpack", "handbag", "none"]
  assert [table[p][g] for p in (1, 2, 3)] == [1, 0, 0]
  assert [table[p][b] for p in (1, 2, 3)] == [2, 1, 0]
  with pytest.raises(SystemExit, match="synthetic.json: not found"):
    attribute_probe.attribute_table(str(tmp_path / "elsewhere"))


def test_a_tiny_run_reports_val_retrieval_and_accuracy(tmp_path):
  root = str(tmp_path / "set")
  synthetic.generate(root, **TINY_SET)
  out = tmp_path / "probe.json"
  attribute_probe.main(["--root", root, "--steps", "3", "--batch", "16", "--height", "32",
                        "--width", "16", "--trials", "1", "--out", str(out)])
  result = json.loads(out.read_text())
  assert 0.0 <= result["rank1"] <= 100.0 and 0.0 < result["mAP"] <= 100.0
  for modality in ("visible", "infrared"):
    acc = result["accuracy"][modality]
    assert list(acc) == list(SHARED_ATTRIBUTES)
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def _random_clip(path: str, **vision_overrides) -> str:
  """A converted CLIP with configs/synthetic.py's towers at random weights (the --text_from)."""
  import jax
  import jax.numpy as jnp
  from configs import synthetic as synthetic_config
  from eees_jax import weights as weights_lib
  from eees_jax.models import towers
  c = synthetic_config.get_config()
  vision_cfg = {**c.model.vision, **vision_overrides}
  vision = towers.build_vision_tower(vision_cfg)
  variables = vision.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 16, 3)), jnp.array([0, 1]))
  text_cfg = c.model.text.to_dict()
  text = towers.build_text_tower(text_cfg)
  text_params = text.init(jax.random.PRNGKey(1),
                          jnp.zeros((1, text_cfg["context_length"]), jnp.int32))["params"]
  architecture = {k: vision_cfg[k] for k in ("kind", "width", "output_dim", "heads", "pos_grid")}
  weights_lib.save_converted(weights_lib.CLIPWeights(
      vision_config={**architecture, "layers": list(vision_cfg["layers"]), "num_modalities": 2},
      text_config=text_cfg, vision_params=variables["params"],
      vision_batch_stats=variables["batch_stats"], text_params=text_params, logit_scale=2.5,
      source="test"), path)
  return path


def test_train_root_and_save(tmp_path, capsys):
  import jax
  import numpy as np
  from data_pipelines import sysu_mm01
  from eees_jax import weights as weights_lib
  root, other = str(tmp_path / "set"), str(tmp_path / "other")
  synthetic.generate(root, **TINY_SET)
  synthetic.generate(other, num_ids=10, images_per_camera=1, height=32, width=16, seed=9,
                     purpose="pretrain")
  base, saved = str(tmp_path / "clip"), str(tmp_path / "probe_clip")
  _random_clip(base)
  attribute_probe.main(["--root", root, "--train_root", other, "--steps", "2", "--batch", "8",
                        "--height", "32", "--width", "16", "--trials", "1", "--save", saved,
                        "--text_from", base])
  images = len(sysu_mm01.training_records(other))
  assert images > 0
  assert f"decoding {images} training images of {other}" in capsys.readouterr().out
  before, after = weights_lib.load_clip(base), weights_lib.load_clip(saved)
  same = jax.tree.map(np.array_equal, before.text_params, after.text_params)
  assert all(jax.tree.leaves(same)) and after.logit_scale == before.logit_scale
  assert jax.tree.map(np.shape, after.vision_params) == jax.tree.map(np.shape, before.vision_params)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before.vision_params,
                         after.vision_params)
  assert any(jax.tree.leaves(changed))   # the trained tower, not the base's
  with pytest.raises(SystemExit, match="exists and is not empty"):
    attribute_probe.main(["--root", root, "--save", saved, "--text_from", base])
  # A --text_from whose image tower has other shapes is refused before any image is decoded.
  wide = str(tmp_path / "wide_clip")
  with pytest.raises(SystemExit, match="image tower differs"):
    attribute_probe.main(["--root", root, "--train_root", other, "--height", "32", "--width", "16",
                          "--save", wide, "--text_from", _random_clip(str(tmp_path / "wide"),
                                                                      width=24)])
  assert "decoding" not in capsys.readouterr().out
