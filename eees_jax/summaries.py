"""TensorBoard scalars in the workdir, local or on cloud storage (gs://...), through etils.epath.

tensorboardX writes local folders itself; for a URI workdir its record writer is routed through
epath (the path library of the checkpoints), which rewrites the event file as one object on every
flush (cloud objects cannot be appended to), as tensorboardX's own cloud writers do.
"""
from __future__ import annotations

import io

from etils import epath


class _EpathRecordFile:
  """The file object tensorboardX's RecordWriter writes events into."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:
  def open(self, path: str) -> _EpathRecordFile:
    return _EpathRecordFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def writer(logdir: str):
  """A tensorboardX SummaryWriter into `logdir` (a local folder or a cloud URI)."""
  from tensorboardX import SummaryWriter, record_writer  # pylint: disable=g-import-not-at-top
  if "://" in logdir:
    record_writer.register_writer_factory(logdir.split("://", 1)[0], _EpathWriterFactory())
  return SummaryWriter(logdir)
