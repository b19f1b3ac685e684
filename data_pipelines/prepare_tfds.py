"""Prepares a data set once into TFDS files, the trainer's --config.dataset.source=tfds input.

  python -m data_pipelines.prepare_tfds --dataset=sysu --root=data/SYSU-MM01 --data_dir=data/tfds
  python -m data_pipelines.prepare_tfds --dataset=regdb --root=data/RegDB --data_dir=data/tfds \
      [--splits=1,2]          # RegDB: one builder config per split (default all ten)

Then train with `--config.dataset.source=tfds --config.dataset.tfds_data_dir=data/tfds`. The
builders (data_pipelines/tfds_builders.py) store every image's file bytes as they are, so training
from them gives the folder reader's batches. A split already prepared is left as it is.
"""
from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from data_pipelines import registry
from data_pipelines.records import DatasetError

_DATASET = flags.DEFINE_enum("dataset", None, registry.names(), "Which data set to prepare.")
_ROOT = flags.DEFINE_string("root", None, "The unpacked (or generated) data set folder.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir to prepare into (the trainer's "
                                "--config.dataset.tfds_data_dir).")
_SPLITS = flags.DEFINE_list("splits", [], "RegDB: the splits to prepare (default: all ten).")
flags.mark_flags_as_required(["dataset", "root", "data_dir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from data_pipelines import tfds_builders  # pylint: disable=g-import-not-at-top (TFDS is heavy)
  spec = registry.get(_DATASET.value)
  if _SPLITS.value and not spec.splits:
    raise app.UsageError(f"--splits: {spec.title} has no splits")
  splits = [int(s) for s in _SPLITS.value] or list(spec.splits) or [1]
  bad = [s for s in splits if spec.splits and s not in spec.splits]
  if bad:
    raise app.UsageError(f"--splits: {bad} are not among {spec.title}'s splits {list(spec.splits)}")
  try:
    for split in splits:
      builder = tfds_builders.prepare(spec.name, _ROOT.value, _DATA_DIR.value, split)
      counts = ", ".join(f"{k} {s.num_examples}" for k, s in builder.info.splits.items())
      print(f"{spec.title}{f' split {split}' if spec.splits else ''}: {counts} images in "
            f"{builder.data_dir}", flush=True)
  except DatasetError as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
