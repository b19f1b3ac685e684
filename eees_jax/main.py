"""Command line: `python -m eees_jax.main --config=configs/sysu.py --workdir=workdir/sysu`.

Any config value can be overridden, e.g. `--config.train.epochs=5 --config.loss.cmsp.enabled=False`.

Exit codes: 0 done (trained and evaluated); 1 an error the message explains (bad config value,
data set, checkpoint, synthetic CLIP or workdir; diverged training); 2 a command line that does not parse;
75 (train.PREEMPTED_EXIT_CODE) stopped by SIGTERM after saving: run the same command again to
resume (requeue the job). Known errors print one message and no traceback unless --verbose.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.records import DatasetError
from eees_jax import checkpoints, config_validation, pretrain_clip, train
from eees_jax.weights.errors import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and reports (a folder or a cloud "
                               "URI such as gs://bucket/run); reused to resume.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of a known error too.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors whose message says what is wrong and what to do: one line, no traceback.
KNOWN_ERRORS = (config_validation.ConfigError, DatasetError, CheckpointError,
                checkpoints.WorkdirError, pretrain_clip.PretrainError, FloatingPointError)
USAGE_EXIT_CODE = 2


def _root_message(e: BaseException) -> str:
  """The innermost message of an error that wraps errors (ml_collections wraps KeyErrors)."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  return text.strip()


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every problem (an unknown config key, a missing config file, a
  value of the wrong type) reported as one message and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
    error = getattr(flags.FLAGS["config"].value, "_error", None)  # a config file that did not load
    if error is None:
      return rest
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = f"--config={path} does not load: {lines[-1] if lines else error}"
  except flags.Error as e:
    message = str(e)
  except (KeyError, AttributeError, OSError, ValueError, TypeError) as e:
    if "--verbose" in argv:
      raise
    message = _root_message(e)
    if isinstance(e, (KeyError, AttributeError)):
      message = f"no such config key: {message}"
  print(f"error: the command line does not parse: {message}\n"
        "See `python -m eees_jax.main --helpshort`; config keys are those of the --config file.",
        file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the bar says enough
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    print(f"{e} (exit code {train.PREEMPTED_EXIT_CODE})", file=sys.stderr, flush=True)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except KNOWN_ERRORS as e:
    if _VERBOSE.value:
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
