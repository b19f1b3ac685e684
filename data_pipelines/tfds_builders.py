"""TFDS builders for SYSU-MM01, RegDB, LLCM and the synthetic benchmark.

The real data sets are licensed, so every builder (the synthetic one too) is a manual-download
builder: `manual_dir` is the unpacked (or generated) data set folder. Each builder stores the images as they are on disk (encoded bytes,
checked to decode) with their record fields, in three splits:

  train           training records, pid relabelled 0..N-1 (SYSU-MM01: train + val ids)
  test_visible    every visible test image, pid = the data set's own id
  test_infrared   every infrared test image, pid = the data set's own id

Query and gallery lists are chosen at evaluation time from the test records, with the same
functions as the folder readers: `sysu_mm01.select_gallery` (SYSU-MM01 and the synthetic set; the
query is `test_infrared`), `llcm.select_gallery` and, for RegDB, the two test splits as they are.
`split_records` turns a prepared split back into ImageRecords for them.

Registered names: sysu_mm01, regdb (configs split_1 .. split_10), llcm, eees_synthetic.

Prepare a data set once, then train from it with --config.dataset.source=tfds
--config.dataset.tfds_data_dir=DIR (data_pipelines/registry.py reads the splits back):

  python -m data_pipelines.prepare_tfds --dataset=sysu --root=data/SYSU-MM01 --data_dir=data/tfds
  python -m data_pipelines.prepare_tfds --dataset=regdb --root=data/RegDB --data_dir=data/tfds \
      --splits=1,2,3,4,5,6,7,8,9,10
"""
from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import descriptions as descriptions_lib
from data_pipelines import llcm, regdb, sysu_mm01, synthetic
from data_pipelines.images import check_image
from data_pipelines.records import INFRARED, MODALITY_NAMES, VISIBLE, ImageRecord

SPLITS = ("train", "test_visible", "test_infrared")


def _by_modality(records: Sequence[ImageRecord]) -> dict[str, list[ImageRecord]]:
  return {"test_visible": [r for r in records if r.modality == VISIBLE],
          "test_infrared": [r for r in records if r.modality == INFRARED]}


class _ReidBuilder(tfds.core.GeneratorBasedBuilder):
  """Common features and example generation; subclasses say where the records come from."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  IMAGE_ENCODING = "jpeg"  # None for data sets whose images are not all JPEG (RegDB: BMP).

  @abc.abstractmethod
  def _records(self, root: str) -> dict[str, Sequence[ImageRecord]]:
    """Split name -> records of the unpacked data set at `root`."""

  def _extra_features(self) -> dict:
    return {}

  def _extra_values(self, root: str, records: Sequence[ImageRecord]) -> Iterator[dict]:
    for _ in records:
      yield {}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=self.IMAGE_ENCODING),
            "path": tfds.features.Text(),
            "pid": np.int64,
            "camid": np.int64,
            "modality": tfds.features.ClassLabel(names=[MODALITY_NAMES[VISIBLE], MODALITY_NAMES[INFRARED]]),
            **self._extra_features(),
        }),
        supervised_keys=None,
        disable_shuffling=True,  # Keep the readers' order: test_infrared is then the query list.
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    return {name: self._generate_examples(root, records)
            for name, records in self._records(root).items()}

  def _generate_examples(self, root: str, records: Sequence[ImageRecord]):
    for record, extra in zip(records, self._extra_values(root, records)):
      path = os.path.join(root, record.path)
      check_image(path)  # A damaged file fails here with its name, not inside TensorFlow.
      with open(path, "rb") as f:
        data = f.read()
      yield record.path, {"image": data, "path": record.path, "pid": record.pid,
                          "camid": record.camid, "modality": record.modality, **extra}


class SysuMm01(_ReidBuilder):
  """SYSU-MM01 (Wu et al., ICCV 2017): 491 identities, 4 visible and 2 infrared cameras."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  SYSU-MM01 is licensed: request it from its authors (https://github.com/wuancong/SYSU-MM01),
  unpack it, and pass the folder that holds cam1 .. cam6 and exp/ (train_id.txt, val_id.txt,
  test_id.txt) as manual_dir.
  """

  def _records(self, root):
    return {"train": sysu_mm01.train_set(root).records, **_by_modality(sysu_mm01.test_records(root))}


@dataclasses.dataclass
class RegdbConfig(tfds.core.BuilderConfig):
  """One of RegDB's ten train/test splits."""
  split: int = 1


class Regdb(_ReidBuilder):
  """RegDB (Nguyen et al., Sensors 2017): 412 identities, one visible and one thermal camera."""

  IMAGE_ENCODING = None  # RegDB ships BMP images.
  BUILDER_CONFIGS = [RegdbConfig(name=f"split_{i}", split=i, description=f"idx/*_{i}.txt lists")
                     for i in regdb.SPLITS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  RegDB is licensed: request it from its authors, unpack it, and pass the folder that holds
  idx/ ({train,test}_{visible,thermal}_{1..10}.txt) and the image folders as manual_dir.
  """

  def _records(self, root):
    visible, thermal = regdb.test_sets(root, self.builder_config.split)
    return {"train": regdb.train_set(root, self.builder_config.split).records,
            "test_visible": visible, "test_infrared": thermal}


class Llcm(_ReidBuilder):
  """LLCM (Zhang and Wang, CVPR 2023): low-light visible / near-infrared, 9 cameras."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  LLCM is licensed: sign its release agreement (https://github.com/ZYK100/LLCM), unpack the data,
  and pass the folder that holds idx/ (train_vis.txt, train_nir.txt, test_id.txt), test_vis/ and
  test_nir/ as manual_dir.
  """

  def _records(self, root):
    return {"train": llcm.train_set(root).records, **_by_modality(llcm.test_records(root))}


class EeesSynthetic(_ReidBuilder):
  """The built-in synthetic benchmark (SYSU-MM01 layout) with its imitation-VLM descriptions."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Generate the data set, then pass its folder as manual_dir:
    python -m data_pipelines.synthetic --out DIR
  """

  def _records(self, root):
    return {"train": sysu_mm01.train_set(root).records, **_by_modality(sysu_mm01.test_records(root))}

  def _extra_features(self):
    return {"description": tfds.features.Text()}

  def _extra_values(self, root, records):
    texts = descriptions_lib.load_descriptions(os.path.join(root, synthetic.DESCRIPTIONS), records)
    for text in texts:
      yield {"description": text}


def prepare(dataset: str, root: str, data_dir: str, split: int = 1) -> tfds.core.DatasetBuilder:
  """Prepares data set `dataset` (a data_pipelines.registry name) from its folder into `data_dir`.

  split: RegDB's split (1..10); ignored by the others. A prepared builder is left as it is.
  """
  from data_pipelines import registry  # pylint: disable=g-import-not-at-top (it imports us lazily)
  builder = registry.get(dataset).tfds_builder(data_dir, split)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
  return builder


def split_records(builder: tfds.core.DatasetBuilder, split: str) -> list[ImageRecord]:
  """The records of a prepared split, in the order the reader listed them, without decoding images."""
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda x: {k: x[k] for k in ("path", "pid", "camid", "modality")})
  return [ImageRecord(e["path"].decode("utf-8"), int(e["pid"]), int(e["camid"]), int(e["modality"]))
          for e in tfds.as_numpy(ds)]

