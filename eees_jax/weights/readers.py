"""Reading checkpoint tensors into numpy without ever executing pickled code.

- `.safetensors` files (recognised by their header, whatever the file is named): safetensors.numpy;
- OpenAI's own downloads (RN50.pt, ViT-B-16.pt) are TorchScript zip archives, which torch refuses to
  load weights-only; their tensors are read here from the zip with an unpickler that admits only
  tensor-rebuilding functions and inert stand-ins for the scripted classes (no code runs);
- other torch.save files (zip or legacy pickle): torch.load(weights_only=True), torch imported only
  on this path;
- Hugging Face folders: config.json + model.safetensors or a sharded safetensors index.
Anything else is refused with a message that says what the file is not and what is expected.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from eees_jax.weights.errors import CheckpointError

EXPECTED_SOURCES = ("expected OpenAI's RN50.pt / ViT-B-16.pt as downloaded, a torch.save state dict, "
                    "a .safetensors file or a Hugging Face CLIP folder")


def _to_numpy(value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  import torch  # Only reached from the torch.load path.
  if isinstance(value, torch.Tensor):
    t = value.detach().cpu()
    if t.dtype == torch.bfloat16:
      t = t.to(torch.float32)
    return t.numpy()
  return np.asarray(value)


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _ScriptObject:
  """Inert stand-in for a TorchScript class instance: it only records its pickled state."""

  def __init__(self, *unused):
    self.state = None

  def __setstate__(self, state):
    self.state = state


class _TorchScriptUnpickler(pickle.Unpickler):
  """Unpickles a TorchScript archive's data.pkl admitting only tensor reconstruction."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path

  def find_class(self, module: str, name: str):
    if module.startswith("__torch__"):
      return type(name, (_ScriptObject,), {})
    if module == "torch" and name in _STORAGE_DTYPES:
      return ("storage_type", name)
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return self._rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return lambda data, requires_grad, hooks: data
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch.jit._pickle" and name.startswith("build_"):
      return lambda value: value
    raise CheckpointError(f"{self._path}: the TorchScript archive refers to {module}.{name}, "
                          "which a weights-only reader does not load; export its state dict to "
                          "safetensors instead")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointError(f"{self._path}: unexpected persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    dtype = _STORAGE_DTYPES[storage_type[1]]
    if dtype == "bfloat16":
      import ml_dtypes
      dtype = ml_dtypes.bfloat16
    raw = self._archive.read(f"{self._prefix}/data/{key}")
    return np.frombuffer(raw, dtype=dtype, count=numel)

  @staticmethod
  def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not size:
      return np.array(storage[offset])
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
  return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl")
             for n in archive.namelist())


def _has_pickle_data(archive: zipfile.ZipFile) -> bool:
  """A torch.save zip (since torch 1.6) holds <name>/data.pkl."""
  return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in archive.namelist())


def _read_torchscript(path: str, archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
  """Every tensor attribute of a TorchScript module tree, keyed by its dotted path."""
  pkls = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
  if len(pkls) != 1:
    raise CheckpointError(f"{path}: not a TorchScript archive with one data.pkl")
  prefix = pkls[0].split("/")[0]
  byteorder = f"{prefix}/byteorder"
  if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
    raise CheckpointError(f"{path}: big-endian archives are not supported")
  with archive.open(pkls[0]) as f:
    root = _TorchScriptUnpickler(f, archive, prefix, path).load()
  out: dict[str, np.ndarray] = {}

  def walk(obj, name):
    if isinstance(obj, np.ndarray):
      out[name] = obj
    elif isinstance(obj, _ScriptObject) and isinstance(obj.state, Mapping):
      for k, v in obj.state.items():
        walk(v, f"{name}.{k}" if name else str(k))

  walk(root, "")
  return out


def _looks_like_safetensors(head: bytes) -> bool:
  """safetensors: an 8-byte little-endian header length, then a JSON object."""
  return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32


def _looks_like_pickle(head: bytes) -> bool:
  """A legacy (pre-zip) torch.save file starts with a pickle PROTO opcode, protocol 2..5."""
  return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of an OpenAI-format checkpoint file (.safetensors, torch.save or TorchScript)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file not found: {path}")
  with open(path, "rb") as f:
    head = f.read(16)
  if path.endswith(".safetensors") or _looks_like_safetensors(head):
    return read_safetensors(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      if _is_torchscript(archive):
        return _read_torchscript(path, archive)
      if not _has_pickle_data(archive):
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (it holds no "
                              f"<name>/data.pkl); {EXPECTED_SOURCES}")
  elif not _looks_like_pickle(head):
    size = os.path.getsize(path)
    raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle; "
                          f"{size} bytes starting {head[:8]!r}); {EXPECTED_SOURCES}")
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{path}: reading a torch.save file needs torch; convert it to "
                          ".safetensors or install torch") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types; all mean "cannot read this file".
    raise CheckpointError(f"{path}: a torch.save file that torch's weights-only loader refuses "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "only plain state dicts of tensors are read") from e
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                          f"got {type(obj).__name__}")
  return {str(k): _to_numpy(v) for k, v in obj.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  import safetensors.numpy
  try:
    return dict(safetensors.numpy.load_file(path))
  except KeyError as e:
    raise CheckpointError(f"{path}: tensor dtype {e} is not readable by safetensors.numpy "
                          "(e.g. bfloat16); save the checkpoint in float32 or float16") from e
  except Exception as e:
    raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e


def read_hf_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, tensors) of a Hugging Face CLIP checkpoint folder."""
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    config = json.load(f)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return config, read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
      tensors.update(read_safetensors(os.path.join(path, shard)))
    return config, tensors
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (only "
                        "safetensors Hugging Face checkpoints are read; pickled "
                        "pytorch_model.bin is refused)")
