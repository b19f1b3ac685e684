"""RegDB with CLIP RN50: one model per split (`--config.dataset.split=1..10`), both directions.

  python -m eees_jax.main --config=configs/regdb.py --workdir=workdir/regdb_1 \
      --config.dataset.root=data/RegDB --config.dataset.split=1 --config.model.init.checkpoint=weights/RN50
"""
from configs import common


def get_config():
  c = common.base_config()
  c.dataset.name = "regdb"
  c.dataset.root = "data/RegDB"
  c.dataset.descriptions = "descriptions.jsonl"
  c.model.init.checkpoint = "weights/RN50"
  # RegDB is small (206 training identities, 10 images each): the CAJ/AGW recipes train it longer
  # per epoch at the same schedule; we keep the SYSU schedule and evaluate both directions.
  c.eval.modes = ()
  return c
