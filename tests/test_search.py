"""Exact chunked search, the index folder and the search command line."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eees_jax import embedding, exact_search, search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDING = dict(rtol=1e-4, atol=1e-5)  # inference here runs on 8 devices, the index on 8 too


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _oracle_top_k(gallery, groups, query, k, allowed=None):
  """Plain loop: cosine of every allowed entry, sorted by score then index."""
  g, q = _unit(gallery), _unit(query)
  scored = []
  for i in range(len(g)):
    if allowed is None or groups[i] in allowed:
      scored.append((-float(np.dot(q, g[i])), i))
  scored.sort()
  return [i for _, i in scored[:k]], [-s for s, _ in scored[:k]]


@pytest.mark.parametrize("n,chunk", [(1000, 256), (700, 4096), (3, 256)])
def test_chunked_top_k_equals_a_plain_loop(n, chunk):
  rng = np.random.default_rng(n)
  feats = rng.normal(size=(n, 24)).astype(np.float32)
  feats[n // 2] = feats[0] * 3  # equal cosine with a larger norm: a tie broken by index
  groups = rng.integers(0, 3, n)
  groups[0] = groups[n // 2] = 1
  gallery = exact_search.Gallery(feats, groups, num_groups=3, chunk_size=chunk)
  assert gallery.chunk_size == min(chunk, -(-n // 256) * 256) and len(gallery) == n
  assert len(gallery.chunks) == -(-n // gallery.chunk_size)
  queries = np.concatenate([feats[:1], rng.normal(size=(4, 24))]).astype(np.float32)
  for allowed in (None, [1], [0, 2]):
    scores, index = gallery.search(queries, 30, allowed)
    k = min(30, n if allowed is None else int(np.isin(groups, allowed).sum()))
    assert scores.shape == index.shape == (5, k)
    for row in range(5):
      want_i, want_s = _oracle_top_k(feats, groups, queries[row], 30, allowed)
      np.testing.assert_allclose(scores[row], want_s, atol=2e-6)
      # Exact ties aside (the planted pair), the order is the oracle's.
      assert list(index[row]) == want_i or np.allclose(scores[row], want_s, atol=1e-6)
  if n > 1:
    _, index = gallery.search(feats[:1], 2, [1])
    assert list(index[0]) == [0, n // 2]  # the tie: lower index first
  with pytest.raises(ValueError, match=r"queries must be \[b, 24\]"):
    gallery.search(np.zeros((1, 5)), 3)


def test_gallery_errors_and_limits():
  with pytest.raises(ValueError, match="empty"):
    exact_search.Gallery(np.zeros((0, 4)))
  g = exact_search.Gallery(np.eye(4, dtype=np.float32), [0, 0, 1, 1], num_groups=3,
                           chunk_size=1)
  assert g.search(np.ones((1, 4)), 5, [2])[1].shape == (1, 0)  # no entries of that group
  with pytest.raises(ValueError, match="exceeds the chunk size"):
    g.search(np.ones((1, 4)), 2)


# ----------------------------------------------------------------------------------------------
# Searcher on an index of known features (a stand-in model: the ranking logic, exactly).
# ----------------------------------------------------------------------------------------------

class FakeModel:
  """The parts of inference.Embedder a Searcher uses; features are a function of the pixels."""
  workdir, step, flip, height, width = "fake", 1, False, 8, 4
  feature_dim, joint_dim, model_id = 12, 5, "fake-model"
  modalities = ("visible", "infrared")

  def embed_images(self, images, modality):
    out = []
    for im in images:
      seed = int(np.asarray(im, np.int64).sum()) + (7 if modality == "infrared" else 0)
      out.append(np.random.default_rng(seed).normal(size=self.feature_dim))
    return np.asarray(out, np.float32)

  def joint_of(self, feats):
    return _unit(feats[:, :self.joint_dim]).astype(np.float32)

  def embed_text(self, sentences):
    return np.asarray([_unit(np.random.default_rng(len(s)).normal(size=self.joint_dim))
                       for s in sentences], np.float32)


@pytest.fixture(scope="module")
def fake_index():
  rng = np.random.default_rng(0)
  model = FakeModel()
  entries = [search.Entry(f"cam{c}/{i:04d}.jpg", "infrared" if c in (3, 6) else "visible", c)
             for i in range(40) for c in (1, 3, 6)]
  feats = rng.normal(size=(len(entries), 12)).astype(np.float32)
  index = search.Index(path="idx", meta={"model": search.model_identity(model), "images": "imgs"},
                       entries=entries, features=feats, joint=model.joint_of(feats))
  return model, index


def test_searcher_ranks_as_the_oracle(fake_index):
  model, index = fake_index
  s = search.Searcher(index, model, chunk_size=32)
  image = np.full((6, 3, 3), 5, np.uint8)
  groups = [0 if e.modality == "visible" else 1 for e in index.entries]
  # Image query: its test-time feature against the stored ones, visible entries only.
  hits = s.by_image(image, "infrared", k=7, gallery_modality="visible")
  q = model.embed_images([image], "infrared")[0]
  want_i, want_s = _oracle_top_k(index.features, groups, q, 7, [0])
  assert [h.index for h in hits] == want_i and [h.rank for h in hits] == list(range(1, 8))
  np.testing.assert_allclose([h.score for h in hits], want_s, atol=2e-6)
  assert all(h.entry.modality == "visible" for h in hits)
  # Text query: against the joint features, all modalities.
  hits = s.by_text("a person with a bag", k=5)
  t = model.embed_text(["a person with a bag"])[0]
  assert [h.index for h in hits] == _oracle_top_k(index.joint, groups, t, 5)[0]
  # Fusion: l2((1 - w) l2(v) + w t), written out here.
  for w in (0.5, 0.2):
    hits = s.by_image_and_text(image, "infrared", "a person with a bag", k=6,
                               gallery_modality="visible", text_weight=w)
    v = model.joint_of(model.embed_images([image], "infrared"))[0]
    fused = (1 - w) * _unit(v) + w * _unit(t)
    assert [h.index for h in hits] == _oracle_top_k(index.joint, groups, fused, 6, [0])[0]
  # An indexed image: its stored feature, itself left out.
  hits = s.by_entry(4, k=3, gallery_modality="all")
  want = [i for i in _oracle_top_k(index.features, groups, index.features[4], 4)[0] if i != 4]
  assert [h.index for h in hits] == want[:3]
  with pytest.raises(search.SearchError, match="no image 999"):
    s.by_entry(999)
  with pytest.raises(search.SearchError, match="the query sentence is empty"):
    s.by_text("  ")
  with pytest.raises(search.SearchError, match="gallery modality 'thermal'"):
    s.by_text("x", gallery_modality="thermal")


def test_fuse_joint_is_the_normalised_sum():
  a, b = np.array([[3.0, 4.0]]), np.array([[0.0, 2.0]])
  np.testing.assert_allclose(embedding.fuse_joint(a, b), [[0.6 / np.sqrt(0.36 + 1.8 ** 2),
                                                           1.8 / np.sqrt(0.36 + 1.8 ** 2)]],
                             rtol=1e-6)
  np.testing.assert_allclose(embedding.fuse_joint(a, b, 0.0), [[0.6, 0.8]], rtol=1e-6)
  with pytest.raises(ValueError, match="text_weight"):
    embedding.fuse_joint(a, b, 1.5)


def test_model_checks(fake_index):
  model, index = fake_index
  other = FakeModel()
  other.model_id = "another"
  with pytest.raises(search.SearchError, match="was built by model fake-model .* the model loaded "
                                               "is another"):
    search.Searcher(index, other)
  other = FakeModel()
  other.feature_dim = 24
  with pytest.raises(search.SearchError, match="another feature layout .*feature_dim 12 in the "
                                               "index, 24 for the model"):
    search.check_model(index, other)
  one_stem = FakeModel()
  one_stem.modalities = ("visible",)
  s = search.Searcher(index, one_stem)
  with pytest.raises(search.SearchError, match="has stems for visible images only, not infrared"):
    s.by_image(np.zeros((4, 4, 3), np.uint8), "infrared")


def test_list_images_rules(tmp_path):
  for rel in ("cam3/0001/0001.jpg", "cam1/0001/0002.png", "cam6/0002/0001.JPG", "notes.txt",
              ".hidden/x.jpg"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b"")
  got = search.list_images(str(tmp_path), "sysu")
  assert got == [search.Entry("cam1/0001/0002.png", "visible", 1),
                 search.Entry("cam3/0001/0001.jpg", "infrared", 3),
                 search.Entry("cam6/0002/0001.JPG", "infrared", 6)]
  assert [e.modality for e in search.list_images(str(tmp_path), "visible")] == ["visible"] * 3
  (tmp_path / "loose.jpg").write_bytes(b"")
  with pytest.raises(search.SearchError, match="1 image.* in no SYSU-MM01 camera folder .*loose"):
    search.list_images(str(tmp_path), "sysu")
  (tmp_path / "empty").mkdir()
  with pytest.raises(search.SearchError, match="holds no images"):
    search.list_images(str(tmp_path / "empty"), "visible")


# ----------------------------------------------------------------------------------------------
# The command line on a trained workdir.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tiny_workdir, tmp_path_factory):
  from eees_jax import inference
  out = str(tmp_path_factory.mktemp("search") / "index")
  assert search.main(["index", "--workdir", tiny_workdir["workdir"], "--images",
                      tiny_workdir["root"], "--out", out, "--modality", "sysu"]) == 0
  return dict(tiny_workdir, index=out, model=inference.load(tiny_workdir["workdir"]))


def _run(args, capsys):
  code = search.main(args)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_index_holds_the_models_features(built):
  model, index = built["model"], search.read_index(built["index"])
  assert index.meta["model"]["model_id"] == model.model_id
  assert index.meta["model"]["step"] == 2 and index.images == os.path.abspath(built["root"])
  n_images = sum(1 for e in index.entries)
  assert n_images == index.meta["count"] == sum(index.meta["modalities"].values())
  assert all(e.modality == ("infrared" if e.camera in (3, 6) else "visible")
             for e in index.entries)
  paths = [os.path.join(built["root"], e.path) for e in index.entries]
  modality = [e.modality for e in index.entries]
  np.testing.assert_allclose(index.features, model.embed_images(paths, modality), **ROUNDING)
  np.testing.assert_allclose(index.joint, model.embed_joint(paths, modality), **ROUNDING)
  assert not [f for f in os.listdir(os.path.dirname(built["index"])) if f.startswith(".")]


def test_query_commands(built, tmp_path, capsys):
  index, root = built["index"], built["root"]
  query = os.path.join(root, "cam3/0001/0001.jpg")
  picture = str(tmp_path / "ranked.png")
  code, out, _ = _run(["query", "--index", index, "--image", query, "--modality", "infrared",
                       "-k", "7", "--gallery-modality", "visible", "--picture", picture], capsys)
  assert code == 0
  rows = [line.split() for line in out.splitlines()[2:] if line.strip()[:1].isdigit()]
  assert len(rows) == 7 and [int(r[0]) for r in rows] == list(range(1, 8))
  assert all(r[2] == "visible" for r in rows)
  # The scores printed are the best cosines of the model's own features (oracle: numpy).
  model, idx = built["model"], search.read_index(index)
  q = _unit(model.embed_images([query], "infrared")[0])
  visible = [i for i, e in enumerate(idx.entries) if e.modality == "visible"]
  cos = np.sort(_unit(idx.features[visible]) @ q)[::-1][:7]
  np.testing.assert_allclose([float(r[1]) for r in rows], cos, atol=2e-4)
  scores = {e.path: float(_unit(idx.features[i]) @ q) for i, e in enumerate(idx.entries)}
  assert all(abs(scores[r[4]] - float(r[1])) < 2e-4 for r in rows)
  with Image.open(picture) as im:
    assert im.size[0] > 500 and im.size[1] > 100
  # Text, and text fused with the image.
  text = "a woman with long hair in a dark skirt, carrying a backpack"
  code, out, _ = _run(["query", "--index", index, "--text", text, "-k", "4",
                       "--gallery-modality", "infrared", "--picture", ""], capsys)
  rows = [line.split() for line in out.splitlines()[2:]]
  assert code == 0 and len(rows) == 4 and all(r[2] == "infrared" for r in rows)
  t = model.embed_text([text])[0]
  infrared = [i for i, e in enumerate(idx.entries) if e.modality == "infrared"]
  np.testing.assert_allclose([float(r[1]) for r in rows],
                             np.sort(idx.joint[infrared] @ t)[::-1][:4], atol=2e-4)
  code, out, _ = _run(["query", "--index", index, "--image", query, "--modality", "infrared",
                       "--text", text, "--gallery-modality", "visible", "-k", "3",
                       "--picture", str(tmp_path / "fused.png")], capsys)
  assert code == 0 and "text weight 0.5" in out and os.path.exists(tmp_path / "fused.png")


def _one_line_error(code, err, pattern):
  """Exit status 2 and one line "error: ..." (after any progress bar), no traceback."""
  assert code == 2 and "Traceback" not in err, err
  lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and sum(l.startswith("error") for l in lines) == 1, err
  assert re.search(pattern, lines[-1]), err


def test_clear_errors(built, tmp_path, capsys):
  index, workdir = built["index"], built["workdir"]
  base = ["query", "--index", index, "--modality", "infrared", "--image"]
  _one_line_error(*_run(base + [str(tmp_path / "nope.jpg")], capsys)[::2],
                  r"image not found: .*nope\.jpg")
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  _one_line_error(*_run(base + [str(bad)], capsys)[::2], r"cannot read image .*bad\.jpg")
  (tmp_path / "empty").mkdir()
  _one_line_error(*_run(["index", "--workdir", workdir, "--images", str(tmp_path / "empty"),
                         "--out", str(tmp_path / "i2")], capsys)[::2], "holds no images")
  _one_line_error(*_run(["index", "--workdir", workdir, "--images", built["root"], "--out",
                         index], capsys)[::2], "already holds an index; pass --overwrite")
  # An unreadable image inside the folder is named.
  folder = tmp_path / "imgs"
  folder.mkdir()
  first_visible = sorted(glob.glob(os.path.join(built["root"], "cam1", "*", "*.jpg")))[0]
  shutil.copy(first_visible, folder / "a.jpg")
  (folder / "b.jpg").write_bytes(b"\xff\xd8 broken")
  _one_line_error(*_run(["index", "--workdir", workdir, "--images", str(folder), "--modality",
                         "visible", "--out", str(tmp_path / "i3")], capsys)[::2], r"b\.jpg")
  assert not os.path.exists(tmp_path / "i3")
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".staging")]
  # An index of another model, or of another layout, is refused.
  tampered = tmp_path / "tampered"
  shutil.copytree(index, tampered)
  meta = json.load(open(tampered / "index.json"))
  meta["model"]["model_id"] = "0123456789abcdef01234567"
  json.dump(meta, open(tampered / "index.json", "w"))
  _one_line_error(*_run(["query", "--index", str(tampered), "--text", "x"], capsys)[::2],
                  "was built by model 0123456789abcdef01234567 .* not comparable")
  meta["model"]["feature_layout"] = "something else"
  json.dump(meta, open(tampered / "index.json", "w"))
  _one_line_error(*_run(["query", "--index", str(tampered), "--text", "x"], capsys)[::2],
                  "holds features of layout 'something else'")
  _one_line_error(*_run(["query", "--index", str(tmp_path), "--text", "x"], capsys)[::2],
                  "is not an index folder")
  _one_line_error(*_run(["query", "--index", index, "--image", str(bad)], capsys)[::2],
                  "--image needs --modality")
  # A model without an infrared stem cannot index infrared images.
  model = built["model"]
  model.modalities, saved = ("visible",), model.modalities
  try:
    with pytest.raises(search.SearchError, match="holds infrared images .* stems for visible"):
      search.build_index(model, built["root"], str(tmp_path / "i4"), "sysu")
    with pytest.raises(ValueError, match="cannot embed infrared images"):
      model.embed_images([os.path.join(built["root"], "cam3/0001/0001.jpg")], "infrared")
  finally:
    model.modalities = saved


def test_overwrite_replaces_an_index_and_the_module_runs(built, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(built["index"], out)
  assert search.main(["index", "--workdir", built["workdir"], "--images",
                      os.path.join(built["root"], "cam1"), "--modality", "visible", "--out", out,
                      "--overwrite"]) == 0
  assert search.read_index(out).meta["modality_rule"] == "visible"
  proc = subprocess.run([sys.executable, "-m", "eees_jax.search", "query", "--index", out,
                         "--image", str(tmp_path / "missing.jpg"), "--modality", "visible"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: image not found")
