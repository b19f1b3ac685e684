"""eees_jax.export: the jax.export artifacts and the SavedModel give the live model's outputs, and
load in a process that has none of this repository's code."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from eees_jax import export

ROUNDING = dict(rtol=1e-4, atol=1e-5)   # the live model runs on 8 devices, the artifacts on 1
SENTENCES = ["a woman with long hair in a dark skirt, carrying a backpack", "a man in shorts",
             "someone", "a person in a white shirt and black trousers, holding a bag"]


@pytest.fixture(scope="module")
def exported(tiny_workdir, tmp_path_factory):
  from eees_jax import inference
  out = str(tmp_path_factory.mktemp("export") / "embedders")
  assert export.main(["--workdir", tiny_workdir["workdir"], "--out", out]) == 0
  model = inference.load(tiny_workdir["workdir"])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, model.height, model.width, 3), dtype=np.uint8)
  modality = np.array([0, 1, 1, 0, 1], np.int32)
  return dict(out=out, model=model, images=images, modality=modality,
              features=model.embed_images(images, modality), text=model.embed_text(SENTENCES),
              tokens=model.tokenizer.tokenize(SENTENCES))


def test_the_spec_describes_the_artifacts(exported):
  model, out = exported["model"], exported["out"]
  spec = json.load(open(os.path.join(out, export.SPEC)))
  assert spec["model"]["model_id"] == model.model_id and spec["model"]["step"] == model.step
  image, text = spec["image_embedder"], spec["text_embedder"]
  assert image["inputs"]["images"]["shape"] == ["b", model.height, model.width, 3]
  assert image["output"]["shape"] == ["b", model.feature_dim]
  assert image["inputs"]["modality"]["values"] == {"visible": 0, "infrared": 1}
  assert text["inputs"]["tokens"]["shape"] == ["b", model.tokenizer.context_length]
  assert text["output"]["shape"] == ["b", model.joint_dim]
  a, b = image["joint_slice"]
  np.testing.assert_allclose(exported["features"][:, a:b],
                             model.embed_joint(exported["images"], exported["modality"]),
                             **ROUNDING)
  tok = spec["tokenizer"]
  assert tok["kind"] == "openai-bpe" and tok["context_length"] == model.tokenizer.context_length
  assert all(os.path.isfile(os.path.join(out, f)) for f in tok["files"])
  for name in (export.IMAGE_FILE, export.TEXT_FILE, export.SAVED_MODEL):
    assert os.path.exists(os.path.join(out, name))


def test_jax_export_artifacts_equal_the_live_model(exported):
  from jax import export as jax_export
  out = exported["out"]
  image = jax_export.deserialize(open(os.path.join(out, export.IMAGE_FILE), "rb").read())
  text = jax_export.deserialize(open(os.path.join(out, export.TEXT_FILE), "rb").read())
  assert set(image.platforms) == set(export.PLATFORMS)
  for rows in (slice(0, 2), slice(0, 5)):  # two batch sizes, one artifact
    np.testing.assert_allclose(image.call(exported["images"][rows], exported["modality"][rows]),
                               exported["features"][rows], **ROUNDING)
    np.testing.assert_allclose(text.call(exported["tokens"][rows]), exported["text"][rows],
                               **ROUNDING)


def test_saved_model_equals_the_live_model(exported):
  import tensorflow as tf
  loaded = tf.saved_model.load(os.path.join(exported["out"], export.SAVED_MODEL))
  embed_images, embed_text = loaded.signatures["embed_images"], loaded.signatures["embed_text"]
  for rows in (slice(0, 1), slice(0, 4)):
    got = embed_images(images=tf.constant(exported["images"][rows]),
                       modality=tf.constant(exported["modality"][rows]))["features"].numpy()
    np.testing.assert_allclose(got, exported["features"][rows], **ROUNDING)
    got = embed_text(tokens=tf.constant(exported["tokens"][rows]))["features"].numpy()
    np.testing.assert_allclose(got, exported["text"][rows], **ROUNDING)


def test_artifacts_load_without_this_code(exported, tmp_path):
  """A fresh interpreter, outside the repository, with jax, numpy and tensorflow only."""
  np.save(tmp_path / "images.npy", exported["images"][:3])
  np.save(tmp_path / "modality.npy", exported["modality"][:3])
  np.save(tmp_path / "tokens.npy", exported["tokens"][:3])
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from jax import export
      import tensorflow as tf
      assert not any(m.startswith(("eees_jax", "data_pipelines")) for m in sys.modules)
      out = {exported["out"]!r}
      x, m, t = (np.load(f"{{n}}.npy") for n in ("images", "modality", "tokens"))
      image = export.deserialize(open(out + "/image_embedder.jax_export", "rb").read())
      text = export.deserialize(open(out + "/text_embedder.jax_export", "rb").read())
      np.save("jax_image.npy", np.asarray(image.call(x, m)))
      np.save("jax_text.npy", np.asarray(text.call(t)))
      saved = tf.saved_model.load(out + "/saved_model")
      np.save("tf_image.npy", saved.embed_images(tf.constant(x), tf.constant(m))["features"].numpy())
      np.save("tf_text.npy", saved.embed_text(tf.constant(t))["features"].numpy())
      """)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for kind in ("jax", "tf"):
    np.testing.assert_allclose(np.load(tmp_path / f"{kind}_image.npy"), exported["features"][:3],
                               **ROUNDING)
    np.testing.assert_allclose(np.load(tmp_path / f"{kind}_text.npy"), exported["text"][:3],
                               **ROUNDING)


def test_errors(exported, tiny_workdir, tmp_path, capsys):
  assert export.main(["--workdir", tiny_workdir["workdir"], "--out", exported["out"]]) == 2
  assert "already holds an export; pass --overwrite" in capsys.readouterr().err
  assert export.main(["--workdir", tiny_workdir["workdir"], "--out", str(tmp_path / "x"),
                      "--platforms", "cpu,gpu"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: platforms ['cpu', 'gpu']") and err.count("\n") == 1
  assert not os.path.exists(tmp_path / "x")
  assert export.main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 2
  assert "does not exist" in capsys.readouterr().err
