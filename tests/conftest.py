"""Test-wide set-up: 8 fake CPU devices (sharding tests) and quiet TensorFlow, before any import."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A tiny trained workdir and its synthetic data set (tests/_tiny_workdir.py), built once."""
  import _tiny_workdir
  return _tiny_workdir.train(str(tmp_path_factory.mktemp("tiny_workdir")))
