"""Tests of the evaluation report: files, markdown table, CMC plot, ranked-list sheet."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines.records import INFRARED, VISIBLE, ImageRecord
from eees_jax.evaluation import report


def _row(trial, r1, mAP, reranked=False):
  cmc = [r1] + [min(100.0, r1 + 5.0 * i) for i in range(1, 20)]
  return {"trial": trial, "rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "rank20": cmc[19],
          "mAP": mAP, "mINP": mAP / 2, "cmc": cmc, "cmc_standard": [c / 2 for c in cmc],
          "num_queries": 30, "num_gallery": 12, "num_valid_queries": 30}


def _results():
  def setting(rows, reranked):
    mean = {k: float(np.mean([r[k] for r in rows]))
            for k in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")}
    mean["cmc"] = np.mean([r["cmc"] for r in rows], axis=0).tolist()
    mean["cmc_standard"] = np.mean([r["cmc_standard"] for r in rows], axis=0).tolist()
    return {"query": "infrared", "gallery": "visible", "reranked": reranked, "trials": rows,
            "mean": mean, "cmc_kind": "unique-identity"}
  return {"dataset": "SYSU-MM01", "protocol": "sysu", "distance": "cosine", "max_rank": 20,
          "trial_key": "trial", "settings": {
              "all-search single-shot": setting([_row(0, 50.0, 40.0), _row(1, 60.0, 44.0)], False),
              "all-search single-shot (re-ranked)": setting([_row(0, 70.0, 55.0),
                                                             _row(1, 72.0, 57.0)], True)}}


def test_write_report_files_and_table(tmp_path):
  results = _results()
  md = report.write_report(results, str(tmp_path), "Synthetic test")
  assert json.load(open(tmp_path / "results.json")) == results
  assert open(tmp_path / "results.md").read() == md
  assert md.startswith("# Synthetic test")
  lines = md.splitlines()
  # Summary row of the plain setting: the means of the two trials.
  summary = next(l for l in lines if l.startswith("| all-search single-shot | infrared"))
  cells = [c.strip() for c in summary.strip("|").split("|")]
  assert cells[2] == "plain"
  assert cells[3:] == ["55.00", "75.00", "97.50", "100.00", "42.00", "21.00"]
  # Every row carrying re-ranked numbers says so.
  reranked_rows = [l for l in lines if l.startswith("|") and ("72.00" in l or "71.00" in l or "57.00" in l)]
  assert reranked_rows and all("re-ranked" in l for l in reranked_rows)
  # Per-trial rows and the mean row of each setting.
  assert "| 1 | plain | 60.00 | 80.00 | 100.00 | 100.00 | 44.00 | 22.00 |" in lines
  assert any(l.startswith("| **mean** | re-ranked | **71.00**") for l in lines)
  assert "Standard CMC" in md and "![CMC curves](cmc.png)" in md
  im = Image.open(tmp_path / "cmc.png")
  assert im.size == (640, 440)
  assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn


def _close(pixel, colour, tol=8):
  assert np.max(np.abs(np.asarray(pixel) - np.asarray(colour))) <= tol, (pixel, colour)


def _make_images(root, records, colours):
  for r in records:
    path = os.path.join(root, r.path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (32, 64), colours[r.pid]).save(path)


def test_ranked_list_sheet_frames_true_matches_green(tmp_path):
  colours = {1: (200, 200, 0), 2: (0, 200, 200), 3: (120, 0, 160)}
  queries = [ImageRecord(f"cam3/{p:04d}/0001.jpg", p, 3, INFRARED) for p in (1, 2, 3)]
  gallery = [ImageRecord(f"cam{c}/{p:04d}/0001.jpg", p, c, VISIBLE) for p in (1, 2, 3)
             for c in (1, 2)]
  _make_images(str(tmp_path), queries + gallery, colours)
  rng = np.random.default_rng(0)
  dist = rng.random((3, 6))
  cell = (40, 80)
  shown = report.ranked_list_sheet(dist, queries, gallery, str(tmp_path), str(tmp_path / "s.png"),
                                   num_queries=3, top=4, cell=cell)
  # Expected: the 4 nearest gallery images per query, by an independent argsort.
  want = [list(np.argsort(dist[i], kind="stable")[:4]) for i in range(3)]
  assert shown == want
  sheet = np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).astype(int)
  w, h = cell
  caption, gap = 14, 12
  for row in range(3):
    y = row * (h + caption + 4)
    assert tuple(sheet[y + 1, 1]) == report._BLUE  # query frame
    _close(sheet[y + h // 2, w // 2], colours[queries[row].pid])  # query image inside (JPEG)
    for rank, g in enumerate(want[row]):
      x = w + gap + rank * (w + 2)
      frame = tuple(sheet[y + 1, x + 1])
      expected = report._GREEN if gallery[g].pid == queries[row].pid else report._RED
      assert frame == expected
      _close(sheet[y + h // 2, x + w // 2], colours[gallery[g].pid])


def test_ranked_list_sheet_hides_protocol_removals_and_takes_indices(tmp_path):
  colours = {1: (200, 0, 0), 2: (0, 0, 200)}
  queries = [ImageRecord("cam3/0001/0001.jpg", 1, 3, INFRARED)]
  gallery = [ImageRecord(f"cam{c}/{p:04d}/0001.jpg", p, c, VISIBLE) for p in (1, 2) for c in (1, 2)]
  _make_images(str(tmp_path), queries + gallery, colours)
  ranked = np.array([[1, 3, 0, 2]])  # indices, nearest first; 1 and 3 are camera 2
  shown = report.ranked_list_sheet(ranked, queries, gallery, str(tmp_path),
                                   str(tmp_path / "s.png"), top=3, protocol="sysu")
  assert shown == [[0, 2]]
  shown = report.ranked_list_sheet(ranked, queries, gallery, str(tmp_path),
                                   str(tmp_path / "s.png"), top=3)
  assert shown == [[1, 3, 0]]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    report.ranked_list_sheet(ranked, queries, gallery, str(tmp_path / "nowhere"),
                             str(tmp_path / "s.png"), top=2)


@pytest.mark.parametrize("layout", ["deen", "query_gallery"])
def test_llcm_report_says_which_way_each_direction_was_ranked(layout):
  """DEEN's visible-to-infrared ranks visible images for drawn infrared ones: the report says so."""
  from eees_jax.evaluation import protocols
  recs = [ImageRecord(f"{m}/cam{cam}/{p}/{n}.jpg", p, cam, modality)
          for p in (1, 2) for m, modality, cams in (("vis", VISIBLE, (1, 2)), ("nir", INFRARED, (1, 4)))
          for cam in cams for n in range(2)]
  feature = lambda r: np.eye(4, dtype=np.float32)[r.pid] + 0.01 * (hash(r.path) % 7)
  results = protocols.evaluate_llcm(lambda rs: np.stack([feature(r) for r in rs]), None, trials=1,
                                    layout=layout, records=recs)
  md = report.results_markdown(results, "LLCM")
  rows = {}  # setting -> its row of the summary table (the first table)
  for line in md.splitlines():
    if line.startswith("| "):
      rows.setdefault(line.split(" | ")[0][2:], line)
  assert "| infrared → visible | plain |" in rows["infrared to visible"]
  if layout == "deen":
    assert "| infrared → visible (see note) | plain |" in rows["visible to infrared"]
    assert "Note (visible to infrared): DEEN layout" in md
    assert "each drawn infrared image (one per identity and camera, per trial) ranks all visible" in md
  else:
    assert "| visible → infrared | plain |" in rows["visible to infrared"]
    assert "Note" not in md and "DEEN layout" not in md


def test_ranked_list_sheet_reads_images_from_an_image_source(tmp_path):
  """Prepared TFDS splits have no files: the sheet takes the images' bytes from the source."""
  import io
  from data_pipelines.image_source import ImageSource

  def png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 16), colour).save(buf, format="PNG")
    return buf.getvalue()

  class Memory(ImageSource):
    data = {"q.png": png((0, 0, 255)), "a.png": png((255, 0, 0)), "b.png": png((0, 255, 0))}
    describe = lambda self: "memory"
    location = lambda self, r: r.path
    items = lambda self, rs: [self.data[r.path] for r in rs]
    read = lambda self, item: item
    read_bytes = lambda self, r: self.data[r.path]

  q = [ImageRecord("q.png", 1, 3, INFRARED)]
  g = [ImageRecord("a.png", 2, 1, VISIBLE), ImageRecord("b.png", 1, 1, VISIBLE)]
  shown = report.ranked_list_sheet(np.array([[0.2, 0.1]]), q, g, Memory(), str(tmp_path / "s.png"),
                                   top=2, cell=(16, 32))
  assert shown == [[1, 0]]
  sheet = np.asarray(Image.open(tmp_path / "s.png"))
  assert tuple(sheet[16, 8]) == (0, 0, 255)  # the query's own pixels, from the source's bytes


def test_text_retrieval_rows_are_a_labelled_section_of_the_report(tmp_path):
  """results["text_retrieval"] (the trainer's extra rows) renders after the image rows, under its
  own title and notes, and travels in results.json; the CMC plot keeps the image settings."""
  from eees_jax.evaluation import text_retrieval as tr
  results = _results()
  text = {"dataset": "SYSU-MM01", "protocol": "sysu", "distance": "cosine", "max_rank": 20,
          "trial_key": "trial", "query_source": tr.QUERY_SOURCE, "text_weight": 0.5,
          "settings": {tr.setting_names()[0]: dict(_results()["settings"]["all-search single-shot"],
                                                   query="text", gallery="infrared")}}
  config = {"loss": {t: {"enabled": False} for t in tr.TEXT_TERMS},
            "model": {"init": {"checkpoint": "weights/RN50", "load": ("vision", "text")}},
            "text": {"trainable": False}}
  results["text_retrieval"] = tr.report_section(text, config)
  md = report.write_report(results, str(tmp_path), "Synthetic test")
  assert json.load(open(tmp_path / "results.json"))["text_retrieval"]["title"] == tr.SECTION_TITLE
  image_part, text_part = md.split(f"\n## {tr.SECTION_TITLE}\n")
  assert "| all-search single-shot | infrared → visible | plain | 55.00 |" in image_part
  assert tr.setting_names()[0] not in image_part
  # The text rows: the same numbers, labelled with their query and gallery, one heading level down.
  assert (f"| {tr.setting_names()[0]} | text → infrared | plain | 55.00 | 75.00 | 97.50 | 100.00 | "
          "42.00 | 21.00 |") in text_part
  assert "\n### Mean over 2 trials\n" in text_part and f"\n### {tr.setting_names()[0]}\n" in text_part
  assert "held-out visible captions: the caption of one of the identity's visible test images" in text_part
  assert ("Text alignment of this model: no text term (baseline): v was trained by the identity and "
          "triplet losses only") in text_part
  assert "Text tower: pretrained (weights/RN50), frozen." in text_part
