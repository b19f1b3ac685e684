"""A tiny trained workdir for the tests of what uses a trained model (search, serve, export, text
retrieval): a synthetic SYSU-layout set of 16 identities at 32x16 and an EEES model trained two
steps from scratch (frozen random text tower, so the workdir holds a text_tower file), whose
report carries the text-to-person rows (eval.text_retrieval).

Built once per test session (conftest.py: `tiny_workdir`); ~20 s on two cores.
"""
import os

from _tiny_config import TINY_SET, tiny_config
from data_pipelines import synthetic


def config(root: str):
  """tests/_tiny_config.py's tiny config, two steps, its text tower frozen, text rows reported."""
  c = tiny_config(root, epochs=1, max_steps=2)
  c.input.cache_decoded = False
  c.text.update(trainable=False, embed_batch_size=64)
  c.eval.update(trials=1, ranked_list_queries=0, text_retrieval=True)
  c.mesh.data = 1
  return c


def train(base: str) -> dict:
  """Generates the set under base/synthetic, trains into base/run; returns root, workdir, config."""
  from eees_jax import train as train_lib
  root, workdir = os.path.join(base, "synthetic"), os.path.join(base, "run")
  synthetic.generate(root, **TINY_SET)
  c = config(root)
  train_lib.train_and_evaluate(c, workdir)
  return {"root": root, "workdir": workdir, "config": c}
