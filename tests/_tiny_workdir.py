"""A tiny trained workdir for the tests of what uses a trained model (search, serve, export, text
retrieval): a synthetic SYSU-layout set of 16 identities at 32x16 and an EEES model trained two
steps from scratch (frozen random text tower, so the workdir holds a text_tower file), whose
report carries the text-to-person rows (eval.text_retrieval).

Built once per test session (conftest.py: `tiny_workdir`); ~20 s on two cores.
"""
import os

from configs import common, synthetic as synthetic_config
from data_pipelines import synthetic

SET = dict(num_ids=16, images_per_camera=2, height=32, width=16, seed=3, val_fraction=0.2,
           num_test=5)


def config(root: str):
  c = synthetic_config.get_config()
  c.dataset.root = root
  c.dataset.generate.update(SET)
  c.pretrain.enabled = False
  c.loss = common.loss_config()   # SPEC's weights, as tests/test_train.py's tiny_config
  c.model.init.checkpoint = ""
  c.input.update(height=32, width=16, P=4, K=2, eval_batch_size=16, cache_decoded=False)
  c.input.aug.pad = 2
  c.model.vision.update(layers=(1, 1, 1, 1), width=8, output_dim=32, heads=2)
  c.model.text.update(width=32, heads=2, layers=1, embed_dim=32, context_length=40)
  c.text.update(trainable=False, embed_batch_size=64)
  c.optim.update(warmup_epochs=1, milestones=(3,))
  c.train.update(epochs=1, max_steps=2, log_every_steps=1, checkpoint_every_steps=2,
                 eval_every_epochs=0)
  c.eval.update(modes=("all",), trials=1, ranked_list_queries=0, text_retrieval=True)
  c.mesh.data = 1
  return c


def train(base: str) -> dict:
  """Generates the set under base/synthetic, trains into base/run; returns root, workdir, config."""
  from eees_jax import train as train_lib
  root, workdir = os.path.join(base, "synthetic"), os.path.join(base, "run")
  synthetic.generate(root, **SET)
  c = config(root)
  train_lib.train_and_evaluate(c, workdir)
  return {"root": root, "workdir": workdir, "config": c}
