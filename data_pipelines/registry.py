"""The data sets: config.dataset.name -> everything that differs between them.

For each data set: its training-set reader, its test protocol (with the evaluation options it
honours), the images to describe (eees_jax.describe), the names of its result settings (the
ablation table), whether it has a validation split for tuning (config.dataset.holdout), its RegDB-
style per-split models, its TFDS builder, and where to get it. The trainer, eees_jax.describe,
eees_jax.ablation and eees_jax.config_validation look data sets up here; nothing else branches on
a data set's name.

Images come from `config.dataset.source`: "folders" (the unpacked data set under
`config.dataset.root`) or "tfds" (the splits data_pipelines/tfds_builders.py prepared into
`config.dataset.tfds_data_dir`): the same records, the same bytes, the same batches.

Data flows one way: the registry imports the readers, and the evaluation protocols (lazily, in
the functions that run them); nothing here imports training.
"""
from __future__ import annotations

import abc
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from data_pipelines import image_source, llcm, regdb, sysu_mm01
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord, TrainSet

SOURCES = ("folders", "tfds")
TFDS_TEST_SPLITS = ("test_visible", "test_infrared")
Extract = Callable[[Sequence[ImageRecord]], np.ndarray]


class Dataset(abc.ABC):
  """One data set. Subclasses fill in the class attributes and the reader / protocol methods.

  title: the name results and reports use. download_hint: what to do when the folder is missing.
  holdout: has exp/val_id.txt (SYSU layout), so config.dataset.holdout can tune on held-out ids.
  splits: RegDB's one-model-per-split numbers (config.dataset.split); () for one model.
  generated: written by our generator on first use (config.dataset.generate).
  eval_options: the config.eval options that only some protocols read and this one honours.
  protocol: the ranking rules (eees_jax.evaluation.metrics) of its test protocol.
  """
  name: str = ""
  title: str = ""
  download_hint: str = ""
  holdout: bool = False
  splits: tuple[int, ...] = ()
  generated: bool = False
  eval_options: tuple[str, ...] = ()
  protocol: str = ""

  @abc.abstractmethod
  def train_set(self, root: str, dataset: Any) -> TrainSet:
    """Training records read from the unpacked folder."""

  @abc.abstractmethod
  def folder_test_records(self, root: str, dataset: Any, split: str) -> list[ImageRecord]:
    """Every test image ("val": of the held-out ids) read from the unpacked folder."""

  @abc.abstractmethod
  def describe_records(self, root: str, split: str, describe_config: Any) -> list[ImageRecord]:
    """The images of a split ("train" / "test") that eees_jax.describe describes."""

  @abc.abstractmethod
  def tfds_builder(self, data_dir: str, split: int):
    """The data_pipelines.tfds_builders builder of this data set (RegDB: of `split`)."""

  @abc.abstractmethod
  def setting_names(self, config: Any) -> list[str]:
    """The protocol's settings for `config.eval`, before re-ranked twins, in report order."""

  @abc.abstractmethod
  def evaluate(self, extract: Extract, config: Any, records: list[ImageRecord],
               rerank: dict | None, progress: bool = False) -> dict:
    """The protocol's results (eees_jax.evaluation.protocols) on the given test records
    (progress: a bar over the scored trials)."""

  @abc.abstractmethod
  def ranked_list_sets(self, config: Any, records: list[ImageRecord]
                       ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(query, gallery) of the ranked-list sheet: trial 0 of the headline setting."""

  def prepare(self, dataset: Any) -> None:
    """Anything to do before the folder is read (the synthetic set is generated here)."""


class SysuMm01(Dataset):
  name, title, protocol = "sysu", "SYSU-MM01", "sysu"
  download_hint = ("SYSU-MM01 is distributed by its authors on request (see the README, 'Real data "
                   "sets'); unpack it and pass --config.dataset.root=<folder with cam1..cam6 and exp/>")
  holdout = True
  eval_options = ("modes", "shots", "gallery_source")

  def train_set(self, root, dataset):
    return sysu_mm01.train_set(root, holdout=bool(dataset.holdout))

  def folder_test_records(self, root, dataset, split):
    return sysu_mm01.test_records(root, split)

  def describe_records(self, root, split, describe_config):
    return list(sysu_mm01.train_set(root).records if split == "train"
                else sysu_mm01.test_records(root))

  def tfds_builder(self, data_dir, split):
    from data_pipelines import tfds_builders  # pylint: disable=g-import-not-at-top (heavy)
    return tfds_builders.SysuMm01(data_dir=data_dir)

  def setting_names(self, config):
    from eees_jax.evaluation import protocols  # pylint: disable=g-import-not-at-top
    return [protocols.sysu_setting_name(m, int(s)) for m in config.eval.modes
            for s in config.eval.shots]

  def evaluate(self, extract, config, records, rerank, progress=False):
    from eees_jax.evaluation import protocols  # pylint: disable=g-import-not-at-top
    return protocols.evaluate_sysu(
        extract, config.dataset.root, modes=tuple(config.eval.modes), shots=tuple(config.eval.shots),
        trials=config.eval.trials, gallery_source=config.eval.gallery_source, rerank=rerank,
        split=eval_split(config.dataset), records=records, progress=progress)

  def ranked_list_sets(self, config, records):
    mode = config.eval.modes[0] if config.eval.modes else "all"
    return sysu_mm01.select_query(records), sysu_mm01.select_gallery(records, mode, 0)


class Synthetic(SysuMm01):
  """The built-in benchmark: SYSU-MM01's layout and protocol, generated on first use."""
  name, title = "synthetic", "the synthetic benchmark"
  download_hint = ("the synthetic benchmark is generated into config.dataset.root on first use "
                   "(config.dataset.generate); point --config.dataset.root at an empty folder")
  generated = True

  def prepare(self, dataset):
    from data_pipelines import datasets  # pylint: disable=g-import-not-at-top (it imports us)
    datasets.ensure_synthetic(dataset)

  def tfds_builder(self, data_dir, split):
    from data_pipelines import tfds_builders  # pylint: disable=g-import-not-at-top (heavy)
    return tfds_builders.EeesSynthetic(data_dir=data_dir)


class RegDB(Dataset):
  name, title, protocol = "regdb", "RegDB", "regdb"
  download_hint = ("RegDB is distributed by its authors on request; unpack it and pass "
                   "--config.dataset.root=<folder with idx/ and the image folders>")
  splits = regdb.SPLITS

  def train_set(self, root, dataset):
    return regdb.train_set(root, int(dataset.split))

  def folder_test_records(self, root, dataset, split):
    visible, thermal = regdb.test_sets(root, int(dataset.split))
    return visible + thermal

  def describe_records(self, root, split, describe_config):
    # The union over the configured splits: one descriptions file serves every split's model.
    out = []
    for s in describe_config.regdb_splits:
      if split == "train":
        out += regdb.train_set(root, int(s)).records
      else:
        visible, thermal = regdb.test_sets(root, int(s))
        out += visible + thermal
    return out

  def tfds_builder(self, data_dir, split):
    from data_pipelines import tfds_builders  # pylint: disable=g-import-not-at-top (heavy)
    return tfds_builders.Regdb(config=f"split_{int(split)}", data_dir=data_dir)

  def setting_names(self, config):
    from eees_jax.evaluation import protocols  # pylint: disable=g-import-not-at-top
    return [protocols.direction_setting_name(d) for d in protocols.REGDB_DIRECTIONS]

  def evaluate(self, extract, config, records, rerank, progress=False):
    from eees_jax.evaluation import protocols  # pylint: disable=g-import-not-at-top
    split = int(config.dataset.split)
    sets = {split: _by_modality(records)}
    return protocols.evaluate_regdb(lambda s: extract, config.dataset.root, splits=(split,),
                                    rerank=rerank, test_sets=sets.__getitem__, progress=progress)

  def ranked_list_sets(self, config, records):
    visible, thermal = _by_modality(records)
    return visible, thermal  # the headline setting: visible to thermal


class LLCM(Dataset):
  name, title, protocol = "llcm", "LLCM", "llcm"
  download_hint = ("LLCM is distributed by its authors on request; unpack it and pass "
                   "--config.dataset.root=<folder with idx/, test_vis/ and test_nir/>")
  eval_options = ("llcm_layout",)

  def train_set(self, root, dataset):
    return llcm.train_set(root)

  def folder_test_records(self, root, dataset, split):
    return llcm.test_records(root)

  def describe_records(self, root, split, describe_config):
    return list(llcm.train_set(root).records if split == "train" else llcm.test_records(root))

  def tfds_builder(self, data_dir, split):
    from data_pipelines import tfds_builders  # pylint: disable=g-import-not-at-top (heavy)
    return tfds_builders.Llcm(data_dir=data_dir)

  def setting_names(self, config):
    from eees_jax.evaluation import protocols  # pylint: disable=g-import-not-at-top
    return [protocols.direction_setting_name(d) for d in protocols.LLCM_DIRECTIONS]

  def evaluate(self, extract, config, records, rerank, progress=False):
    from eees_jax.evaluation import protocols  # pylint: disable=g-import-not-at-top
    return protocols.evaluate_llcm(extract, config.dataset.root, trials=config.eval.trials,
                                   layout=config.eval.llcm_layout, rerank=rerank, records=records,
                                   progress=progress)

  def ranked_list_sets(self, config, records):
    direction = llcm.DIRECTIONS[0]
    return llcm.select_query(records, direction), llcm.select_gallery(records, direction, 0)


def _by_modality(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
  return ([r for r in records if r.modality == VISIBLE], [r for r in records if r.modality == INFRARED])


_REGISTRY: dict[str, Dataset] = {d.name: d for d in (SysuMm01(), RegDB(), LLCM(), Synthetic())}


def names() -> tuple[str, ...]:
  """The registered data set names."""
  return tuple(_REGISTRY)


def get(name: str) -> Dataset:
  """The data set called `name` (config.dataset.name, describe's --dataset)."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise DatasetError(f"data set {name!r} is not one of {', '.join(_REGISTRY)}") from None


def eval_split(dataset: Any) -> str:
  """"val" for a holdout run (held-out training ids), else "test"."""
  return "val" if dataset.get("holdout", False) else "test"


# --------------------------------------------------------------------------------------------
# Reading: training set, test records and images, from folders or prepared TFDS splits.


def _check_root(spec: Dataset, root: str) -> str:
  if not root or not os.path.isdir(root):
    raise DatasetError(f"config.dataset.root={root!r} is not a folder. {spec.download_hint}")
  return root


def _check_holdout(spec: Dataset, dataset: Any) -> None:
  if dataset.get("holdout", False) and not spec.holdout:
    raise DatasetError(f"config.dataset.holdout=True needs a validation id list (SYSU-MM01 layout: "
                       f"exp/val_id.txt); {spec.title} has none. Set --config.dataset.holdout=False")


def _source(dataset: Any) -> str:
  source = dataset.get("source", "folders")
  if source not in SOURCES:
    raise DatasetError(f"config.dataset.source={source!r} is not one of {', '.join(SOURCES)}")
  return source


@functools.lru_cache(maxsize=4)
def _tfds_images(name: str, data_dir: str, split: int, splits: tuple[str, ...]
                 ) -> image_source.TfdsImages:
  """The held splits of a prepared builder; cached, so training and evaluation read them once."""
  spec = get(name)
  if not data_dir:
    raise DatasetError("config.dataset.source=tfds needs --config.dataset.tfds_data_dir=<the "
                       "data_dir the data set was prepared into>")
  builder = spec.tfds_builder(data_dir, split)
  missing = [s for s in splits if s not in builder.info.splits]
  if missing:
    raise DatasetError(
        f"{spec.title} is not prepared in TFDS data_dir {data_dir} (no {builder.data_dir} with "
        f"split(s) {', '.join(missing)}). Prepare it once: python -m data_pipelines.prepare_tfds "
        f"--dataset={name} --root=<the unpacked folder> --data_dir={data_dir}"
        + (f" --splits={split}" if spec.splits else ""))
  return image_source.TfdsImages(builder, splits)


def _tfds(dataset: Any, splits: tuple[str, ...]) -> image_source.TfdsImages:
  spec = get(dataset.name)
  if dataset.get("holdout", False):
    raise DatasetError("config.dataset.holdout=True reads exp/val_id.txt, which the prepared TFDS "
                       "splits do not hold; tune with --config.dataset.source=folders")
  return _tfds_images(spec.name, str(dataset.get("tfds_data_dir", "")),
                      int(dataset.split) if spec.splits else 0, splits)


def load_train_set(dataset: Any) -> TrainSet:
  """Training records (and where their images come from) for `config.dataset`."""
  spec = get(dataset.name)
  _check_holdout(spec, dataset)
  if _source(dataset) == "tfds":
    images = _tfds(dataset, ("train",))
    records = tuple(images.records("train"))
    pids = sorted({r.pid for r in records})
    if pids != list(range(len(pids))):
      raise DatasetError(f"{images.describe()}: training labels are not 0..N-1; prepare it again")
    return TrainSet(root=dataset.root, records=records, num_classes=len(pids), images=images)
  spec.prepare(dataset)
  return spec.train_set(_check_root(spec, dataset.root), dataset)


def test_records(config: Any) -> list[ImageRecord]:
  """Every image the protocol may use (val ids for a holdout run), from the configured source."""
  dataset = config.dataset
  spec = get(dataset.name)
  _check_holdout(spec, dataset)
  if _source(dataset) == "tfds":
    images = _tfds(dataset, TFDS_TEST_SPLITS)
    return [r for split in TFDS_TEST_SPLITS for r in images.records(split)]
  return spec.folder_test_records(_check_root(spec, dataset.root), dataset, eval_split(dataset))


def eval_images(dataset: Any) -> image_source.ImageSource:
  """Where the test images of `config.dataset` come from (input_pipeline.eval_dataset's `images`)."""
  if _source(dataset) == "tfds":
    return _tfds(dataset, TFDS_TEST_SPLITS)
  return image_source.FolderImages(dataset.root)


# --------------------------------------------------------------------------------------------
# Evaluation and its settings.


def rerank_options(config: Any) -> dict | None:
  """k-reciprocal re-ranking options of config.eval.rerank, or None when it is off."""
  rr = config.eval.rerank
  if not rr.enabled:
    return None
  return {"k1": int(rr.k1), "k2": int(rr.k2), "lambda_value": float(rr.lambda_value)}


def evaluate(extract: Extract, config: Any, progress: bool = False,
             records: list[ImageRecord] | None = None) -> dict:
  """Runs the data set's test protocol with every config.eval option it honours.

  extract(records) -> float32 [n, d] features; returns the protocols results dict. A holdout run
  scores the val ids (SYSU layout); config.dataset.source picks folder or TFDS test records
  (`records`: those of test_records(config), when the caller has them). progress: a bar over the
  scored trials.
  """
  spec = get(config.dataset.name)
  records = test_records(config) if records is None else records
  return spec.evaluate(extract, config, records, rerank_options(config), progress)


def settings(config: Any) -> list[str]:
  """The result settings `evaluate` reports for `config`, in order (re-ranked twins included)."""
  from eees_jax.evaluation import protocols  # pylint: disable=g-import-not-at-top
  spec = get(config.dataset.name)
  return protocols.setting_names(spec.setting_names(config), rerank_options(config) is not None)


def headline_setting(config: Any) -> str:
  """The setting tables and checkpoint selection lead with (the first one)."""
  return settings(config)[0]


def report_title(config: Any) -> str:
  spec = get(config.dataset.name)
  held = " (held-out val ids, not a test result)" if eval_split(config.dataset) == "val" else ""
  return f"EEES on {spec.title}{held}"


def ranked_list(extract: Extract, config: Any, path: str | None,
                records: list[ImageRecord] | None = None) -> None:
  """The ranked-list sheet of the headline setting's first trial, into `path`.

  Features are extracted on every call (in a multi-host run every process must call it, as the
  extraction is a collective); only a call with a `path` draws (pass None on the other processes).
  records: test_records(config), when the caller has them.
  """
  from eees_jax.evaluation import metrics, report  # pylint: disable=g-import-not-at-top
  spec = get(config.dataset.name)
  n = int(config.eval.ranked_list_queries)
  records = test_records(config) if records is None else records
  query, gallery = spec.ranked_list_sets(config, records)
  dist = metrics.cosine_distance(extract(query), extract(gallery))
  if path is None:
    return
  step = max(len(query) // n, 1)
  report.ranked_list_sheet(dist, query, gallery, eval_images(config.dataset), path, num_queries=n,
                           query_indices=list(range(0, len(query), step))[:n],
                           protocol=spec.protocol)
