"""Test-wide set-up, before any import: 8 fake CPU devices (sharding tests), quiet TensorFlow, and
one persistent XLA compilation cache for the session (in-process runs and the subprocesses the
tests launch compile the same tiny programs again and again; a cached program is the same program).
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="eees_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A tiny trained workdir and its synthetic data set (tests/_tiny_workdir.py), built once."""
  import _tiny_workdir
  return _tiny_workdir.train(str(tmp_path_factory.mktemp("tiny_workdir")))
