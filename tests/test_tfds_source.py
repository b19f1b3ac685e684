"""TFDS as an input source: a set prepared into TFDS trains and evaluates exactly as its folder."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import synthetic as synthetic_config
from data_pipelines import input_pipeline, registry, synthetic
from data_pipelines.records import DatasetError

TINY = dict(num_ids=8, num_test=3, images_per_camera=2, height=32, width=16,
             seed=5, val_fraction=0.25)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(root, data_dir): a tiny synthetic set and the TFDS data_dir it was prepared into (CLI)."""
  tmp = tmp_path_factory.mktemp("tfds_source")
  root = synthetic.generate(str(tmp / "set"), **TINY)["out"]
  data_dir = str(tmp / "tfds")
  subprocess.run([sys.executable, "-m", "data_pipelines.prepare_tfds", "--dataset=synthetic",
                  f"--root={root}", f"--data_dir={data_dir}"], check=True, cwd=ROOT,
                 capture_output=True)
  return root, data_dir


def _config(root, source, data_dir=""):
  c = synthetic_config.get_config()
  c.dataset.root = root
  c.dataset.generate.update(TINY)
  c.dataset.source = source
  c.dataset.tfds_data_dir = data_dir
  c.eval.update(modes=("all", "indoor"), trials=3)
  return c


def _batches(train_set, n, **kw):
  it = input_pipeline.train_dataset(train_set, P=2, K=2, height=24, width=12, seed=11, **kw)
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("cache_decoded", [False, True])
def test_tfds_gives_the_folder_readers_batches(prepared, cache_decoded):
  root, data_dir = prepared
  folder = registry.load_train_set(_config(root, "folders").dataset)
  tfds_set = registry.load_train_set(_config(root, "tfds", data_dir).dataset)
  assert tfds_set.records == folder.records and tfds_set.num_classes == folder.num_classes
  assert "TFDS" in tfds_set.source.describe()
  a = _batches(folder, 3, cache_decoded=cache_decoded)
  b = _batches(tfds_set, 3, cache_decoded=cache_decoded)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  assert a[0]["images"].std() > 10  # real pictures, not a blank


def test_tfds_evaluation_images_and_protocol_equal_the_folders(prepared):
  root, data_dir = prepared
  by_folder, by_tfds = _config(root, "folders"), _config(root, "tfds", data_dir)
  records = registry.test_records(by_folder)
  key = lambda r: r.path
  assert sorted(registry.test_records(by_tfds), key=key) == sorted(records, key=key)
  kw = dict(height=24, width=12, batch_size=7, flip=True)
  for x, y in zip(input_pipeline.eval_dataset(registry.eval_images(by_folder.dataset), records, **kw),
                  input_pipeline.eval_dataset(registry.eval_images(by_tfds.dataset), records, **kw)):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)

  def extract(recs):  # features from the decoded test images of the configured source
    def run(config):
      batches = input_pipeline.eval_dataset(registry.eval_images(config.dataset), recs, height=8,
                                            width=4, batch_size=16)
      feats = np.concatenate([b["images"][b["mask"]].reshape(int(b["mask"].sum()), -1)
                              for b in batches])
      return feats.astype(np.float32)
    return run

  results = {}
  for name, config in (("folders", by_folder), ("tfds", by_tfds)):
    results[name] = registry.evaluate(lambda recs: extract(recs)(config), config)
  assert results["folders"] == results["tfds"]
  assert list(results["tfds"]["settings"]) == registry.settings(by_tfds)


def test_unprepared_tfds_and_holdout_say_what_to_do(prepared, tmp_path):
  root, data_dir = prepared
  with pytest.raises(DatasetError, match="not prepared in TFDS data_dir .*python -m "
                                         "data_pipelines.prepare_tfds --dataset=synthetic"):
    registry.load_train_set(_config(root, "tfds", str(tmp_path / "empty")).dataset)
  with pytest.raises(DatasetError, match="tfds_data_dir"):
    registry.load_train_set(_config(root, "tfds", "").dataset)
  held = _config(root, "tfds", data_dir)
  held.dataset.holdout = True
  with pytest.raises(DatasetError, match="holdout=True .* --config.dataset.source=folders"):
    registry.load_train_set(held.dataset)
