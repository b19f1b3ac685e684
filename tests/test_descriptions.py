"""Descriptions file: join on image path, field choice, error messages, atomic writes."""
import json
import os

import pytest

from data_pipelines import descriptions
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord


def _record(image, description, rewritten=None):
  return {"image": image, "modality": "visible", "description": description, "rewritten": rewritten,
          "model": "m", "prompt": "p", "rewrite_model": None, "rewrite_prompt": None, "generation": {},
          "flags": []}


def _write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


RECORDS = [ImageRecord("cam1/0001/0002.jpg", 0, 1, VISIBLE),
           ImageRecord("cam3/0001/0001.jpg", 0, 3, INFRARED),
           ImageRecord("cam1/0001/0001.jpg", 0, 1, VISIBLE)]


@pytest.fixture
def path(tmp_path):
  p = str(tmp_path / "descriptions.jsonl")
  _write_lines(p, [json.dumps(_record("cam1/0001/0001.jpg", "a man in a red shirt", "man, red shirt")),
                   "",  # Blank lines are allowed.
                   json.dumps(_record("cam3/0001/0001.jpg", "a man in a shirt")),
                   json.dumps(_record("cam1/0001/0002.jpg", "an old text")),
                   json.dumps(_record("cam1/0001/0002.jpg", "a man walking", "man walking")),
                   json.dumps(_record("cam9/0009/0009.jpg", "not a training image"))])
  return p


def test_join_follows_record_order(path):
  assert descriptions.load_descriptions(path, RECORDS) == [
      "a man walking", "a man in a shirt", "a man in a red shirt"]  # Later line for 0002 wins.


def test_auto_prefers_rewritten(path):
  assert descriptions.load_descriptions(path, RECORDS, field="auto") == [
      "man walking", "a man in a shirt", "man, red shirt"]


def test_rewritten_missing_is_an_error(path):
  with pytest.raises(DatasetError, match=r"1 of 3 images have no 'rewritten' text.*\n  cam3/0001/0001.jpg\n"
                                         r"Run the rewrite stage"):
    descriptions.load_descriptions(path, RECORDS, field="rewritten")


def test_missing_images_listed(path):
  records = RECORDS + [ImageRecord(f"cam2/0002/{n:04d}.jpg", 1, 2, VISIBLE) for n in range(1, 13)]
  with pytest.raises(DatasetError) as e:
    descriptions.load_descriptions(path, records)
  message = str(e.value)
  assert "12 of 15 images have no 'description' text" in message
  assert "cam2/0002/0010.jpg" in message and "cam2/0002/0011.jpg" not in message  # First 10 only.
  assert "python -m eees_jax.describe" in message


def test_empty_description_counts_as_missing(tmp_path):
  p = str(tmp_path / "d.jsonl")
  _write_lines(p, [json.dumps(_record("cam1/0001/0001.jpg", "  "))])
  with pytest.raises(DatasetError, match="1 of 1 images"):
    descriptions.load_descriptions(p, RECORDS[2:])


def test_malformed_line(path):
  with open(path, "a") as f:
    f.write('{"image": "cam1/0001/0003.jpg", "descr\n')
  with pytest.raises(DatasetError, match=r"descriptions.jsonl:7: not valid JSON"):
    descriptions.read_records(path)
  _write_lines(path, ['["a list"]'])
  with pytest.raises(DatasetError, match=r"descriptions.jsonl:1: expected a JSON object"):
    descriptions.load_descriptions(path, RECORDS)


def test_missing_file_and_bad_field(tmp_path, path):
  with pytest.raises(DatasetError, match="not found.*python -m eees_jax.describe"):
    descriptions.load_descriptions(str(tmp_path / "absent.jsonl"), RECORDS)
  with pytest.raises(ValueError, match="field"):
    descriptions.load_descriptions(path, RECORDS, field="caption")


def test_write_records_round_trip_and_atomic(tmp_path):
  p = str(tmp_path / "out" / "d.jsonl")
  rows = [_record("cam1/0001/0001.jpg", "un homme"), _record("cam3/0001/0001.jpg", "a woman")]
  assert descriptions.write_records(p, iter(rows)) == 2
  assert descriptions.read_records(p) == {r["image"]: r for r in rows}
  assert "un homme" in open(p, encoding="utf-8").read()
  assert os.stat(p).st_mode & 0o444 == 0o444  # Readable like any file, not mkstemp's 0600.
  before = open(p).read()
  with pytest.raises(ValueError, match="record 1 has no string 'image'"):
    descriptions.write_records(p, [rows[0], {"description": "no image"}])
  assert open(p).read() == before  # The failed write left the old file intact...
  assert os.listdir(os.path.dirname(p)) == ["d.jsonl"]  # ...and no temporary file.
