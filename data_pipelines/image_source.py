"""Where a data set's encoded images come from: files under its folder, or prepared TFDS splits.

Readers list ImageRecords with paths relative to the data set root; an image source turns records
into encoded image bytes. The input pipelines decode those bytes with the same ops whatever the
source, so a run reading the folder and a run reading the TFDS splits prepared from it
(data_pipelines/tfds_builders.py stores every file's bytes as they are on disk) see the same
pixels and, for the same seed, the same batches.

What travels through tf.data per record is an "item": the file path (folders, read inside the
pipeline) or the encoded bytes themselves (TFDS, held in host memory: the prepared splits are read
once, about the size of the data set's image files). TensorFlow and TFDS are imported only when used.
"""
from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import Any

from data_pipelines.records import DatasetError, ImageRecord


class ImageSource(abc.ABC):
  """Encoded bytes of a data set's images, looked up by record."""

  @abc.abstractmethod
  def describe(self) -> str:
    """Where the images are, for messages."""

  @abc.abstractmethod
  def location(self, record: ImageRecord) -> str:
    """Where one image is, for messages (a file path, or the record within the prepared splits)."""

  @abc.abstractmethod
  def items(self, records: Sequence[ImageRecord]) -> list[Any]:
    """What tf.data carries for each record (str path or bytes); `read` turns it into bytes."""

  @abc.abstractmethod
  def read(self, item):
    """tf.string item -> tf.string encoded image (inside a tf.data map)."""

  @abc.abstractmethod
  def read_bytes(self, record: ImageRecord) -> bytes:
    """The encoded image of one record, in Python (ranked-list sheets, error diagnosis)."""

  def missing(self, record: ImageRecord) -> bool:
    """True when the record's image is absent (rather than unreadable)."""
    return False


class FolderImages(ImageSource):
  """Image files under a data set folder."""

  def __init__(self, root: str):
    self.root = os.fspath(root)

  def __repr__(self) -> str:
    return f"FolderImages({self.root!r})"

  def describe(self) -> str:
    return f"folder {self.root}"

  def location(self, record: ImageRecord) -> str:
    return os.path.join(self.root, record.path)

  def items(self, records: Sequence[ImageRecord]) -> list[str]:
    return [os.path.join(self.root, r.path) for r in records]

  def read(self, item):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top (module doc)
    return tf.io.read_file(item)

  def read_bytes(self, record: ImageRecord) -> bytes:
    with open(self.location(record), "rb") as f:
      return f.read()

  def missing(self, record: ImageRecord) -> bool:
    return not os.path.isfile(self.location(record))


def as_source(images: str | os.PathLike | ImageSource) -> ImageSource:
  """A root folder (str) means its files; an ImageSource is returned as it is."""
  return images if isinstance(images, ImageSource) else FolderImages(images)


class TfdsImages(ImageSource):
  """The images (and records) of some splits of a prepared TFDS builder, read once into memory.

  builder: a prepared tfds builder of data_pipelines/tfds_builders.py.
  splits: the splits to hold, e.g. ("train",) or ("test_visible", "test_infrared").
  """

  def __init__(self, builder, splits: Sequence[str]):
    self.builder = builder
    self.splits = tuple(splits)
    self._records: dict[str, list[ImageRecord]] | None = None
    self._bytes: dict[str, bytes] = {}

  def __repr__(self) -> str:
    return f"TfdsImages({self.describe()})"

  def describe(self) -> str:
    config = self.builder.builder_config
    name = self.builder.name + (f"/{config.name}" if config else "")
    return f"TFDS {name} splits {', '.join(self.splits)} in {self.builder.data_dir}"

  def location(self, record: ImageRecord) -> str:
    return f"{record.path} (in {self.describe()})"

  def _load(self) -> None:
    if self._records is not None:
      return
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (module doc)
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    records: dict[str, list[ImageRecord]] = {}
    for split in self.splits:
      ds = self.builder.as_dataset(split=split, shuffle_files=False,
                                   decoders={"image": tfds.decode.SkipDecoding()})
      ds = ds.map(lambda x: {k: x[k] for k in ("path", "pid", "camid", "modality", "image")})
      total = self.builder.info.splits[split].num_examples
      out = records[split] = []
      for e in tqdm(tfds.as_numpy(ds), total=total, unit="image", leave=False,
                    desc=f"reading TFDS {self.builder.name} {split}"):
        record = ImageRecord(e["path"].decode("utf-8"), int(e["pid"]), int(e["camid"]),
                             int(e["modality"]))
        out.append(record)
        self._bytes[record.path] = bytes(e["image"])
    self._records = records

  def records(self, split: str) -> list[ImageRecord]:
    """The records of a held split, in the order the folder reader lists them."""
    if split not in self.splits:
      raise ValueError(f"split {split!r} is not among the held splits {self.splits}")
    self._load()
    return list(self._records[split])

  def _get(self, record: ImageRecord) -> bytes:
    self._load()
    try:
      return self._bytes[record.path]
    except KeyError:
      raise DatasetError(f"image {record.path} is not in {self.describe()}; prepare the TFDS data "
                         "again from the data set folder (python -m data_pipelines.prepare_tfds)"
                         ) from None

  def items(self, records: Sequence[ImageRecord]) -> list[bytes]:
    return [self._get(r) for r in records]

  def read(self, item):
    return item

  def read_bytes(self, record: ImageRecord) -> bytes:
    return self._get(record)
