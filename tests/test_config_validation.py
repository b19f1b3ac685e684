"""Whole-config validation: every shipped config passes; every class of bad value is named."""
from __future__ import annotations

import pytest

from eees_jax import config_validation
from eees_jax.config_validation import ConfigError
from test_configs import CONFIGS, parse


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_root"))


def _valid(name, root, *args):
  return parse(name, f"--config.dataset.root={root}", *args)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_are_valid(name, root):
  config_validation.validate(_valid(name, root))


def test_every_promised_option_validates_where_it_applies(root):
  config_validation.validate(_valid(
      "sysu", root, "--config.eval.rerank.enabled=True", "--config.eval.gallery_source=official",
      "--config.eval.shots=(1,10)", "--config.loss.cmsp.intra=hardest",
      "--config.loss.cmsp.hardest_k=3", "--config.loss.dc.enabled=True",
      "--config.loss.dc.hardest_k=3", "--config.loss.dc.distance=cosine"))
  config_validation.validate(_valid("llcm", root, "--config.eval.llcm_layout=query_gallery"))
  config_validation.validate(_valid("regdb", root, "--config.dataset.split=10",
                                    "--config.dataset.source=tfds",
                                    "--config.dataset.tfds_data_dir=gs://bucket/tfds"))
  config_validation.validate(_valid("synthetic", root, "--config.dataset.holdout=True"))


# (config, command-line overrides, the start of the line the error must hold for each bad value)
BAD = [
    ("synthetic", ["--config.model.dtype=bf16"], ["model.dtype = 'bf16': one of float32, bfloat16"]),
    ("synthetic", ["--config.optim.lr=-1"], ["optim.lr = -1.0: a finite number > 0"]),
    ("synthetic", ["--config.optim.lr=inf"], ["optim.lr = inf"]),
    ("synthetic", ["--config.input.height=0"], ["input.height = 0: an integer >= 1"]),
    ("synthetic", ["--config.eval.trials=0"], ["eval.trials = 0: an integer >= 1"]),
    ("synthetic", ["--config.input.P=1", "--config.input.K=0"],
     ["input.P = 1: an integer >= 2", "input.K = 0: an integer >= 1"]),
    ("synthetic", ["--config.dataset.name=market1501"],
     ["dataset.name = 'market1501': one of sysu, regdb, llcm, synthetic"]),
    ("synthetic", ["--config.loss.cmsp.intra=max"], ["loss.cmsp.intra = 'max': one of mean, hardest"]),
    ("synthetic", ["--config.loss.cmsp.intra=hardest"], ["loss.cmsp.hardest_k = None: an integer >= 1"]),
    ("synthetic", ["--config.loss.cmsp.hardest_k=2"], ["loss.cmsp.hardest_k = 2: unset with"]),
    ("synthetic", ["--config.loss.cmsp.distance=l1", "--config.loss.dc.distance=manhattan"],
     ["loss.cmsp.distance = 'l1': one of euclidean, cosine", "loss.dc.distance = 'manhattan'"]),
    ("synthetic", ["--config.optim.probe_epochs=-1", "--config.optim.probe_frozen=(encoder"],
     ["optim.probe_epochs = -1.0: a finite number >= 0", "optim.probe_frozen = '(encoder': a valid"]),
    ("synthetic", ["--config.loss.pair.kind=concat"],
     ["loss.pair.kind = 'concat': one of sum, linear, cross_attention"]),
    ("synthetic", ["--config.loss.ese.tau=0", "--config.loss.wrt.weight=-0.5"],
     ["loss.ese.tau = 0.0: a finite number > 0", "loss.wrt.weight = -0.5"]),
    ("synthetic", ["--config.model.init.load=('vision','heads')"],
     ["model.init.load = ('vision', 'heads'): a tuple of distinct tower names out of vision, text"]),
    ("synthetic", ["--config.eval.modes=('outdoor',)"], ["eval.modes = ('outdoor',)"]),
    ("synthetic", ["--config.eval.modes=()"], ["eval.modes = (): at least one SYSU-MM01 search mode"]),
    ("synthetic", ["--config.eval.best_metric=map"], ["eval.best_metric = 'map': one of rank1"]),
    ("synthetic", ["--config.eval.rerank.k1=0", "--config.eval.rerank.lambda_value=2"],
     ["eval.rerank.k1 = 0", "eval.rerank.lambda_value = 2.0"]),
    ("synthetic", ["--config.eval.gallery_source=drawn"], ["eval.gallery_source = 'drawn': one of random"]),
    ("synthetic", ["--config.eval.llcm_layout=transposed"], ["eval.llcm_layout = 'transposed'"]),
    ("synthetic", ["--config.eval.llcm_layout=query_gallery"],
     ["eval.llcm_layout = 'query_gallery': deen for the synthetic benchmark"]),
    ("synthetic", ["--config.optim.milestones=(70,40)", "--config.optim.groups=(('[', 1.0),)"],
     ["optim.milestones = (70, 40): increasing epochs", "optim.groups = (('[', 1.0),)"]),
    ("synthetic", ["--config.train.epochs=0", "--config.train.max_steps=0"],
     ["train.epochs = 0", "train.max_steps = 0: -1 (train all epochs)"]),
    ("synthetic", ["--config.input.aug.flip=1.5"], ["input.aug: augmentation setting flip"]),
    ("synthetic", ["--config.dataset.source=hdf5"], ["dataset.source = 'hdf5': one of folders, tfds"]),
    ("synthetic", ["--config.dataset.source=tfds"], ["dataset.tfds_data_dir = '': the TFDS data_dir"]),
    ("synthetic", ["--config.mesh.data=0"], ["mesh.data = 0: -1 (every device)"]),
    ("synthetic", ["--config.model.text.heads=3"], ["model.text.heads = 3: a divisor of model.text.width=64"]),
    ("regdb", ["--config.dataset.split=11"], ["dataset.split = 11: one of 1, 2, 3"]),
    ("regdb", ["--config.dataset.holdout=True"], ["dataset.holdout = True: False: RegDB has no validation"]),
    ("llcm", ["--config.eval.modes=('all',)", "--config.eval.gallery_source=official"],
     ["eval.modes = ('all',): () for LLCM", "eval.gallery_source = 'official': random for LLCM"]),
    ("sysu", ["--config.eval.gallery_source=official", "--config.dataset.holdout=True"],
     ["eval.gallery_source = 'official': random with dataset.holdout=True"]),
    ("sysu", ["--config.dataset.root=no/such/folder"],
     ["dataset.root = 'no/such/folder': the unpacked data set folder. SYSU-MM01 is distributed"]),
]


@pytest.mark.parametrize("name,args,expected", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_bad_values_are_each_named_with_what_is_allowed(name, args, expected, root):
  config = _valid(name, root, *args)
  with pytest.raises(ConfigError) as info:
    config_validation.validate(config)
  problems = info.value.problems
  assert len(problems) == len(expected), problems
  for want in expected:
    assert any(p.startswith(want) for p in problems), (want, problems)
  assert isinstance(info.value, ValueError)
  assert all(p in str(info.value) for p in problems)


def test_one_error_lists_every_bad_value(root):
  config = _valid("synthetic", root, "--config.model.dtype=bf16", "--config.optim.lr=-1",
                  "--config.input.height=0", "--config.eval.trials=0")
  with pytest.raises(ConfigError, match=r"(?s)4 invalid values.*input\.height.*model\.dtype.*"
                                        r"optim\.lr.*eval\.trials"):
    config_validation.validate(config)


def test_a_config_missing_a_section_is_named(root):
  config = _valid("synthetic", root)
  config.unlock()
  del config["mesh"]
  with pytest.raises(ConfigError, match=r"mesh\.data: missing"):
    config_validation.validate(config)


def test_an_option_added_later_compares_equal_to_its_absence_only_at_its_old_behaviour():
  """A run recorded before optim.probe_epochs existed resumes with probe_epochs=0, not with 1."""
  recorded = {"optim": {"lr": 1e-3}, "seed": 0}
  now = {"optim": {"lr": 1e-3, "probe_epochs": 0.0, "probe_frozen": "^model/encoder/"}, "seed": 0}
  assert config_validation.differences(recorded, now) == []
  now["optim"]["probe_epochs"] = 1.0
  assert config_validation.differences(recorded, now) == [
      "optim.probe_epochs: '(absent)' there, 1.0 now"]
  # Recorded with the option: every difference counts, the neutral value included.
  recorded["optim"]["probe_epochs"] = 2.0
  now["optim"]["probe_epochs"] = 0.0
  assert config_validation.differences(recorded, now) == [
      "optim.probe_epochs: 2.0 there, 0.0 now"]
  assert config_validation.differences({"pretrain": {"steps": 5}},
                                       {"pretrain": {"steps": 5, "visible_only": False}}) == []
  assert config_validation.differences({"pretrain": {"steps": 5}},
                                       {"pretrain": {"steps": 5, "visible_only": True}}) != []
  # Keys not in ADDED_OPTIONS still count when absent.
  now["seed_extra"] = 1
  assert "seed_extra: '(absent)' there, 1 now" in config_validation.differences(recorded, now)
