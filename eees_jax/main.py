"""Command line: `python -m eees_jax.main --config=configs/sysu.py --workdir=workdir/sysu`.

Any config value can be overridden, e.g. `--config.train.epochs=5 --config.loss.cmsp.enabled=False`.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from eees_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and reports; reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the bar says enough
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
