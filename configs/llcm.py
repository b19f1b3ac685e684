"""LLCM with CLIP RN50, both directions (visible->infrared and infrared->visible).

  python -m eees_jax.main --config=configs/llcm.py --workdir=workdir/llcm \
      --config.dataset.root=data/LLCM --config.model.init.checkpoint=weights/RN50
"""
from configs import common


def get_config():
  c = common.base_config()
  c.dataset.name = "llcm"
  c.dataset.root = "data/LLCM"
  c.dataset.descriptions = "descriptions.jsonl"
  c.model.init.checkpoint = "weights/RN50"
  c.eval.modes = ()
  return c
