"""bench.attribute_probe: attribute targets from synthetic.json; a run end to end on a tiny set."""
import json

import pytest

from bench import attribute_probe
from data_pipelines import synthetic
from data_pipelines.synthetic.identities import SHARED_ATTRIBUTES
from test_train import TINY_SET


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
