"""The tests' tiny training config, in one place: as a ConfigDict for in-process runs and as the
command-line overrides that build the same config for runs of `python -m eees_jax.main`.

Both views come from one builder, so a test that compares an in-process run with a command-line
one (tests/test_multiprocess.py) cannot drift apart when configs/synthetic.py changes.
"""
import ml_collections

from configs import common, synthetic as synthetic_config
from eees_jax import config_validation

# A synthetic set of 16 identities at 32x16: seconds to generate and to train on.
TINY_SET = dict(num_ids=16, num_test=5, images_per_camera=2, height=32, width=16, seed=3,
                val_fraction=0.2)


def tiny_config(root: str, **train_kw) -> ml_collections.ConfigDict:
  """configs/synthetic.py shrunk to TINY_SET under root; train_kw update the train section."""
  c = synthetic_config.get_config()
  c.dataset.root = root
  c.dataset.generate.update(TINY_SET)
  c.pretrain.enabled = False          # no CLIP pretraining: the tiny towers start from scratch
  # SPEC's loss weights: configs/synthetic.py's are tuned for EEES from its pretrained CLIP, and
  # a from-scratch run learns less under them (tests/test_learning.py).
  c.loss = common.loss_config()
  # The real-data configs' parameter groups (classifiers at 2x): the synthetic config's slower
  # classifiers are tuned for EEES from its pretrained CLIP too, and tests/test_learning.py's
  # recorded numbers were measured with these.
  c.optim.groups = common.base_config().optim.groups
  # The rate the synthetic config had before its 16x2 batches (the tiny runs keep 4x2): the tests
  # that train with this config were written against it.
  c.optim.lr = 1e-3
  c.model.init.checkpoint = ""
  c.text.trainable = True
  c.input.update(height=32, width=16, P=4, K=2, eval_batch_size=16)
  c.input.aug.pad = 2
  # SPEC's random erasing, which the synthetic config turns off for its pretrained-CLIP stage:
  # tests/test_learning.py's recorded numbers were measured with it.
  c.input.aug.erasing_prob = common.base_config().input.aug.erasing_prob
  c.model.vision.update(layers=(1, 1, 1, 1), width=8, output_dim=32, heads=2)
  c.model.text.update(width=32, heads=2, layers=1, embed_dim=32, context_length=40)
  c.text.embed_batch_size = 32
  c.optim.warmup_epochs = 1
  c.optim.milestones = (3,)
  c.train.update(epochs=2, log_every_steps=1, checkpoint_every_steps=2, eval_every_epochs=0)
  c.train.update(train_kw)
  c.eval.update(modes=("all",), trials=2, ranked_list_queries=2)
  return c


def as_overrides(config: ml_collections.ConfigDict) -> dict:
  """The `--config.<key>=<value>` overrides that turn configs/synthetic.py into config: every leaf
  whose value differs. Values are left as Python values; str() of each is its flag text."""
  base = config_validation.flat(synthetic_config.get_config().to_dict())
  wanted = config_validation.flat(config.to_dict())
  if base.keys() != wanted.keys():
    raise ValueError("the config has other keys than configs/synthetic.py, which overrides cannot "
                     f"express: {sorted(base.keys() ^ wanted.keys())}")
  return {k: v for k, v in wanted.items() if v != base[k]}
