"""SYSU-MM01 with CLIP RN50: the full EEES recipe (SPEC sections 1-3, 5).

  python -m eees_jax.main --config=configs/sysu.py --workdir=workdir/sysu \
      --config.dataset.root=data/SYSU-MM01 --config.model.init.checkpoint=weights/RN50
"""
from configs import common


def get_config():
  c = common.base_config()
  c.dataset.name = "sysu"
  c.dataset.root = "data/SYSU-MM01"
  c.dataset.descriptions = "descriptions.jsonl"
  c.model.init.checkpoint = "weights/RN50"
  return c
