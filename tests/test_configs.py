"""The experiment configs on a real command line: every documented option can be overridden."""
from __future__ import annotations

import os
import re

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("synthetic", "sysu", "regdb", "llcm")

# Options the README / SPEC promise, with a non-default value each.
OVERRIDES = {
    "loss.cmsp.intra": "hardest",
    "loss.cmsp.hardest_k": 3,
    "loss.cmsp.distance": "cosine",
    "loss.dc.enabled": True,
    "loss.dc.hardest_k": 2,
    "loss.dc.distance": "cosine",
    "model.text.eos_token_id": 49407,
    "eval.rerank.enabled": True,
    "eval.rerank.k1": 10,
    "eval.rerank.k2": 3,
    "eval.rerank.lambda_value": 0.5,
    "eval.gallery_source": "official",
    "eval.llcm_layout": "query_gallery",
    "dataset.source": "tfds",
    "dataset.tfds_data_dir": "data/tfds",
    "eval.shots": (1, 10),
    "model.init.load": ("vision",),
    "optim.probe_epochs": 1.5,
    "optim.probe_frozen": "^model/encoder/layer",
}


def parse(config_name: str, *args: str):
  """The config `python -m eees_jax.main --config=configs/<name>.py <args>` would run with."""
  argv = ["prog", f"--config={os.path.join(ROOT, 'configs', config_name + '.py')}", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _get(config, dotted: str):
  for key in dotted.split("."):
    config = config[key]
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_promised_option_is_overridable_from_the_command_line(name):
  args = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
          for k, v in OVERRIDES.items()]
  config = parse(name, *args)
  for key, value in OVERRIDES.items():
    assert _get(config, key) == value, key
  # The unset defaults stay unset (None) without an override, and are typed.
  plain = parse(name)
  for key in ("loss.cmsp.hardest_k", "loss.dc.hardest_k", "model.text.eos_token_id"):
    assert _get(plain, key) is None
  with pytest.raises(flags.IllegalFlagValueError):
    parse(name, "--config.loss.cmsp.hardest_k=three")


def test_the_checkpoint_path_is_the_converted_folder_everywhere():
  """configs, their docstrings and the README all name the convert_clip output folder."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  converted = re.search(r"python -m eees_jax\.convert_clip RN50\.pt (\S+)", readme).group(1)
  named = set(re.findall(r"--config\.model\.init\.checkpoint=(\S+?)[`\s\\]", readme))
  for name in ("sysu", "regdb", "llcm"):
    doc = open(os.path.join(ROOT, "configs", name + ".py")).read()
    named |= set(re.findall(r"--config\.model\.init\.checkpoint=(\S+)", doc))
    assert parse(name).model.init.checkpoint == converted, name
  named.discard("RN50.pt")  # the README's "the trainer also accepts the checkpoint directly"
  assert named == {converted}


def test_the_synthetic_pretraining_size_is_set_on_the_command_line():
  assert tuple(parse("synthetic").pretrain.input_size) == (64, 32)
  size = parse("synthetic", "--config.pretrain.input_size=(80, 40)").pretrain.input_size
  assert tuple(size) == (80, 40)
  assert tuple(parse("synthetic", "--config.pretrain.input_size=()").pretrain.input_size) == ()
