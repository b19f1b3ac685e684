"""CLIP weights: read OpenAI / Hugging Face checkpoints, convert them to the Flax towers, save, merge.

Sources `load_clip` reads (no pickle is ever executed):
- an OpenAI-format state dict (the names of OpenAI's clip/model.py, also used by open_clip):
  * `.safetensors` file, read with safetensors.numpy (no torch);
  * `.pt` / `.pth` / `.bin` saved with torch.save: torch.load(weights_only=True) (torch is imported
    only for this path);
  * OpenAI's own downloads (RN50.pt, ViT-B-16.pt) are TorchScript archives, which torch refuses to
    load weights-only; their tensors are read here from the zip with an unpickler that admits only
    tensor-rebuilding functions and inert stand-ins for the scripted classes (no code runs);
- a Hugging Face CLIP folder (config.json + model.safetensors or a sharded index), ViT towers only;
- a folder written by `save_converted` (config.json + params.msgpack).

The architecture is inferred from tensor shapes as OpenAI's build_model does (heads = width / 64,
RN attention-pool heads = 32 * width / 64). Conversion: torch conv OIHW -> flax HWIO, linear
weights transposed, nn.MultiheadAttention's in_proj split into q/k/v, BatchNorm weight/bias ->
scale/bias and running_mean/var -> batch_stats mean/var, and the single CLIP stem (RN) or patch
embedding (ViT) stacked num_modalities times. Missing, unknown or mis-shaped tensors raise
CheckpointError naming every offending key.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from eees_jax.models.clip_resnet import ModifiedResNet
from eees_jax.models.clip_text import TextTransformer
from eees_jax.models.clip_vit import VisionTransformer

Tree = dict[str, Any]
CONVERTED_FORMAT = "eees_jax-clip"
CONVERTED_VERSION = 1
CONVERTED_PARAMS = "params.msgpack"
_MAX_LISTED = 20


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the architecture; names keys and paths."""


@dataclasses.dataclass
class CLIPWeights:
  """Converted CLIP weights, ready for the Flax towers.

  vision_config / text_config: JSON-able dicts for build_vision_tower / build_text_tower
  (vision_config['kind'] is 'resnet' or 'vit'). vision_params / text_params: the towers' 'params'
  collections; vision_batch_stats: the RN tower's 'batch_stats' (None for a ViT).
  """
  vision_config: dict[str, Any]
  text_config: dict[str, Any]
  vision_params: Tree
  vision_batch_stats: Tree | None
  text_params: Tree
  logit_scale: float
  source: str = ""

  def vision_variables(self) -> Tree:
    """{'params': ..., 'batch_stats': ...} (batch_stats only for RN) for module.apply."""
    out = {"params": self.vision_params}
    if self.vision_batch_stats is not None:
      out["batch_stats"] = self.vision_batch_stats
    return out

  def text_variables(self) -> Tree:
    return {"params": self.text_params}


# --- reading tensors ------------------------------------------------------------------------------

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


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of an OpenAI-format checkpoint file (.safetensors, torch.save or TorchScript)."""
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      if _is_torchscript(archive):
        return _read_torchscript(path, archive)
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(f"{path}: reading a torch.save file needs torch; convert it to "
                          ".safetensors or install torch") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types; all mean "cannot read this file".
    raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from e
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), "
                          f"got {type(obj).__name__}")
  return {str(k): _to_numpy(v) for k, v in obj.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  import safetensors.numpy
  try:
    return dict(safetensors.numpy.load_file(path))
  except KeyError as e:
    raise CheckpointError(f"{path}: tensor dtype {e} is not readable by safetensors.numpy "
                          "(e.g. bfloat16); save the checkpoint in float32 or float16") from e
  except Exception as e:
    raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e


# --- conversion helpers -----------------------------------------------------------------------------

class _Source:
  """Checkpoint tensors consumed by a converter, recording missing / mis-shaped / unused keys."""

  def __init__(self, tensors: Mapping[str, np.ndarray], origin: str):
    self.tensors, self.origin = tensors, origin
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.bad_shapes: list[str] = []

  def require(self, key: str) -> np.ndarray:
    """A tensor needed to infer the architecture: missing is an immediate error."""
    if key not in self.tensors:
      raise CheckpointError(f"{self.origin}: missing key {key!r}, needed to infer the "
                            f"architecture ({_listing(sorted(self.tensors), 'keys present')})")
    return self.tensors[key]

  def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    self.used.add(key)
    if key not in self.tensors:
      self.missing.append(key)
      return np.zeros(shape, np.float32)
    value = np.asarray(self.tensors[key])
    if tuple(value.shape) != tuple(shape):
      self.bad_shapes.append(f"{key} {tuple(value.shape)} (expected {tuple(shape)})")
      return np.zeros(shape, np.float32)
    return value.astype(np.float32)

  def finish(self, ignored: Callable[[str], bool], arch: str) -> None:
    unknown = sorted(k for k in self.tensors if k not in self.used and not ignored(k))
    problems = []
    if self.missing:
      problems.append(_listing(self.missing, "missing keys"))
    if unknown:
      problems.append(_listing(unknown, "unknown keys"))
    if self.bad_shapes:
      problems.append(_listing(self.bad_shapes, "wrong shapes"))
    if problems:
      raise CheckpointError(f"{self.origin}: the checkpoint does not match the inferred "
                            f"architecture ({arch}): " + "; ".join(problems))


def _listing(items: list[str], what: str) -> str:
  shown = ", ".join(items[:_MAX_LISTED])
  more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
  return f"{what} ({len(items)}): {shown}{more}"


def _set(tree: Tree, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _conv(src: _Source, key: str, oihw: tuple[int, ...]) -> np.ndarray:
  return np.transpose(src.take(key, oihw), (2, 3, 1, 0))  # OIHW -> HWIO


def _dense(src: _Source, prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> Tree:
  d = {"kernel": src.take(f"{prefix}.weight", (out_dim, in_dim)).T}
  if bias:
    d["bias"] = src.take(f"{prefix}.bias", (out_dim,))
  return d


def _ln(src: _Source, prefix: str, dim: int) -> Tree:
  return {"scale": src.take(f"{prefix}.weight", (dim,)), "bias": src.take(f"{prefix}.bias", (dim,))}


def _bn(src: _Source, prefix: str, dim: int) -> tuple[Tree, Tree]:
  params = {"scale": src.take(f"{prefix}.weight", (dim,)), "bias": src.take(f"{prefix}.bias", (dim,))}
  stats = {"mean": src.take(f"{prefix}.running_mean", (dim,)),
           "var": src.take(f"{prefix}.running_var", (dim,))}
  return params, stats


def _stack(tree: Tree, m: int) -> Tree:
  return jax.tree.map(lambda a: np.stack([a] * m), tree)


def _count_blocks(keys: Iterable[str], prefix: str, index_pos: int) -> int:
  """Number of distinct integer indices at dotted position index_pos among keys under prefix."""
  idx = {int(k.split(".")[index_pos]) for k in keys if k.startswith(prefix)}
  if idx and idx != set(range(len(idx))):
    raise CheckpointError(f"block indices under {prefix!r} are not 0..n-1: {sorted(idx)}")
  return len(idx)


def _square_grid(n_tokens: int, key: str, origin: str) -> int:
  g = round((n_tokens - 1) ** 0.5)
  if g * g + 1 != n_tokens:
    raise CheckpointError(f"{origin}: {key} has {n_tokens} rows, not a square grid + 1")
  return g


def _openai_blocks(src: _Source, prefix: str, layers: int, width: int, mlp_dim: int) -> Tree:
  """OpenAI Transformer (resblocks with nn.MultiheadAttention) -> layers.Transformer params."""
  tree: Tree = {}
  for i in range(layers):
    p = f"{prefix}.resblocks.{i}"
    w_in = src.take(f"{p}.attn.in_proj_weight", (3 * width, width))
    b_in = src.take(f"{p}.attn.in_proj_bias", (3 * width,))
    attn = {name: {"kernel": w_in[j * width:(j + 1) * width].T,
                   "bias": b_in[j * width:(j + 1) * width]}
            for j, name in enumerate(("q_proj", "k_proj", "v_proj"))}
    attn["out_proj"] = _dense(src, f"{p}.attn.out_proj", width, width)
    tree[f"resblocks_{i}"] = {
        "ln_1": _ln(src, f"{p}.ln_1", width), "attn": attn, "ln_2": _ln(src, f"{p}.ln_2", width),
        "c_fc": _dense(src, f"{p}.mlp.c_fc", mlp_dim, width),
        "c_proj": _dense(src, f"{p}.mlp.c_proj", width, mlp_dim)}
  return tree


def _hf_blocks(src: _Source, prefix: str, layers: int, width: int, mlp_dim: int) -> Tree:
  """HF CLIPEncoder (layers.{i}.self_attn / layer_norm1 / mlp.fc1 ...) -> layers.Transformer."""
  tree: Tree = {}
  for i in range(layers):
    p = f"{prefix}.layers.{i}"
    attn = {f"{n}_proj": _dense(src, f"{p}.self_attn.{n}_proj", width, width)
            for n in ("q", "k", "v", "out")}
    tree[f"resblocks_{i}"] = {
        "ln_1": _ln(src, f"{p}.layer_norm1", width), "attn": attn,
        "ln_2": _ln(src, f"{p}.layer_norm2", width),
        "c_fc": _dense(src, f"{p}.mlp.fc1", mlp_dim, width),
        "c_proj": _dense(src, f"{p}.mlp.fc2", width, mlp_dim)}
  return tree


# --- OpenAI state dicts ------------------------------------------------------------------------------

_OPENAI_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size)$|"
                             r"(^|\.)num_batches_tracked$|(^|\.)attn_mask$")


def _openai_resnet(src: _Source, m: int) -> tuple[dict, Tree, Tree]:
  keys = list(src.tensors)
  layers = [_count_blocks(keys, f"visual.layer{s}.", 2) for s in (1, 2, 3, 4)]
  width = src.require("visual.layer1.0.conv1.weight").shape[0]
  pos_key = "visual.attnpool.positional_embedding"
  pos_grid = _square_grid(src.require(pos_key).shape[0], pos_key, src.origin)
  output_dim = src.require("visual.attnpool.c_proj.weight").shape[0]
  embed = 32 * width
  cfg = {"kind": "resnet", "layers": layers, "width": width, "output_dim": output_dim,
         "heads": embed // 64, "pos_grid": pos_grid, "num_modalities": m}
  params: Tree = {}
  stats: Tree = {}
  stem_p: Tree = {}
  stem_s: Tree = {}
  chans = [(3, width // 2), (width // 2, width // 2), (width // 2, width)]
  for j, (cin, cout) in enumerate(chans, start=1):
    stem_p[f"conv{j}"] = {"kernel": _conv(src, f"visual.conv{j}.weight", (cout, cin, 3, 3))}
    stem_p[f"bn{j}"], stem_s[f"bn{j}"] = _bn(src, f"visual.bn{j}", cout)
  params["stem"], stats["stem"] = _stack(stem_p, m), _stack(stem_s, m)
  inplanes = width
  for s, blocks in enumerate(layers):
    planes = width * 2 ** s
    for i in range(blocks):
      p = f"visual.layer{s + 1}.{i}"
      bp: Tree = {}
      bs: Tree = {}
      bp["conv1"] = {"kernel": _conv(src, f"{p}.conv1.weight", (planes, inplanes, 1, 1))}
      bp["bn1"], bs["bn1"] = _bn(src, f"{p}.bn1", planes)
      bp["conv2"] = {"kernel": _conv(src, f"{p}.conv2.weight", (planes, planes, 3, 3))}
      bp["bn2"], bs["bn2"] = _bn(src, f"{p}.bn2", planes)
      bp["conv3"] = {"kernel": _conv(src, f"{p}.conv3.weight", (4 * planes, planes, 1, 1))}
      bp["bn3"], bs["bn3"] = _bn(src, f"{p}.bn3", 4 * planes)
      if i == 0:  # CLIP: stride > 1 or inplanes != 4 * planes, true for every first block.
        bp["downsample_conv"] = {
            "kernel": _conv(src, f"{p}.downsample.0.weight", (4 * planes, inplanes, 1, 1))}
        bp["downsample_bn"], bs["downsample_bn"] = _bn(src, f"{p}.downsample.1", 4 * planes)
      params[f"layer{s + 1}_{i}"], stats[f"layer{s + 1}_{i}"] = bp, bs
      inplanes = 4 * planes
  ap = {"positional_embedding": src.take(pos_key, (pos_grid ** 2 + 1, embed))}
  for n in ("q", "k", "v"):
    ap[f"{n}_proj"] = _dense(src, f"visual.attnpool.{n}_proj", embed, embed)
  ap["c_proj"] = _dense(src, "visual.attnpool.c_proj", output_dim, embed)
  params["attnpool"] = ap
  return cfg, params, stats


def _openai_vit(src: _Source, m: int, heads: int | None) -> tuple[dict, Tree]:
  conv = src.require("visual.conv1.weight")
  width, patch = conv.shape[0], conv.shape[-1]
  keys = list(src.tensors)
  layers = _count_blocks(keys, "visual.transformer.resblocks.", 3)
  mlp_dim = src.require("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]
  pos_grid = _square_grid(src.require("visual.positional_embedding").shape[0],
                          "visual.positional_embedding", src.origin)
  output_dim = src.require("visual.proj").shape[1]
  cfg = {"kind": "vit", "patch_size": patch, "width": width, "layers": layers,
         "heads": heads or width // 64, "output_dim": output_dim, "pos_grid": pos_grid,
         "mlp_dim": mlp_dim, "act": "quick_gelu", "ln_epsilon": 1e-5, "num_modalities": m}
  params = {
      "patch_embed": _stack({"kernel": _conv(src, "visual.conv1.weight",
                                             (width, 3, patch, patch))}, m),
      "class_embedding": src.take("visual.class_embedding", (width,)),
      "positional_embedding": src.take("visual.positional_embedding",
                                       (pos_grid ** 2 + 1, width)),
      "ln_pre": _ln(src, "visual.ln_pre", width),
      "transformer": _openai_blocks(src, "visual.transformer", layers, width, mlp_dim),
      "ln_post": _ln(src, "visual.ln_post", width),
      "proj": src.take("visual.proj", (width, output_dim)),
  }
  return cfg, params


def _openai_text(src: _Source, heads: int | None) -> tuple[dict, Tree]:
  width = src.require("ln_final.weight").shape[0]
  vocab = src.require("token_embedding.weight").shape[0]
  ctx = src.require("positional_embedding").shape[0]
  embed = src.require("text_projection").shape[1]
  layers = _count_blocks(list(src.tensors), "transformer.resblocks.", 2)
  mlp_dim = src.require("transformer.resblocks.0.mlp.c_fc.weight").shape[0]
  cfg = {"vocab_size": vocab, "context_length": ctx, "width": width, "layers": layers,
         "heads": heads or width // 64, "embed_dim": embed, "mlp_dim": mlp_dim,
         "act": "quick_gelu", "ln_epsilon": 1e-5, "eos_token_id": None}
  params = {
      "token_embedding": {"embedding": src.take("token_embedding.weight", (vocab, width))},
      "positional_embedding": src.take("positional_embedding", (ctx, width)),
      "transformer": _openai_blocks(src, "transformer", layers, width, mlp_dim),
      "ln_final": _ln(src, "ln_final", width),
      "text_projection": src.take("text_projection", (width, embed)),
  }
  return cfg, params


def convert_openai_state_dict(tensors: Mapping[str, np.ndarray], *, num_modalities: int = 2,
                              vision_heads: int | None = None, text_heads: int | None = None,
                              origin: str = "state dict") -> CLIPWeights:
  """OpenAI CLIP state dict (RN or ViT; clip/model.py names) -> CLIPWeights.

  vision_heads / text_heads override OpenAI's width / 64 rule (ViT and text only; the RN pool
  always has 32 * width / 64 heads in OpenAI's models).
  """
  src = _Source(tensors, origin)
  if "visual.proj" in tensors:
    vcfg, vparams = _openai_vit(src, num_modalities, vision_heads)
    vstats = None
  elif "visual.layer1.0.conv1.weight" in tensors:
    vcfg, vparams, vstats = _openai_resnet(src, num_modalities)
  else:
    raise CheckpointError(f"{origin}: not an OpenAI CLIP state dict: neither 'visual.proj' (ViT) "
                          "nor 'visual.layer1.0.conv1.weight' (ResNet) is present "
                          f"({_listing(sorted(tensors), 'keys present')})")
  tcfg, tparams = _openai_text(src, text_heads)
  logit_scale = src.take("logit_scale", ())
  src.finish(lambda k: bool(_OPENAI_IGNORED.search(k)), _describe(vcfg, tcfg))
  return _finalise(vcfg, tcfg, vparams, vstats, tparams, float(logit_scale), origin)


# --- Hugging Face checkpoints -------------------------------------------------------------------------

_HF_IGNORED = re.compile(r"(^|\.)position_ids$")


def read_hf_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, tensors) of a Hugging Face CLIP checkpoint folder."""
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    config = json.load(f)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return config, _read_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
      tensors.update(_read_safetensors(os.path.join(path, shard)))
    return config, tensors
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (only "
                        "safetensors Hugging Face checkpoints are read; pickled "
                        "pytorch_model.bin is refused)")


def convert_hf_clip(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                    num_modalities: int = 2, origin: str = "Hugging Face checkpoint"
                    ) -> CLIPWeights:
  """HF CLIPModel (config.json dict + state dict) -> CLIPWeights (ViT vision tower)."""
  if config.get("model_type") != "clip":
    raise CheckpointError(f"{origin}: config.json model_type is {config.get('model_type')!r}, "
                          "expected 'clip'")
  vc = config.get("vision_config") or {}
  tc = config.get("text_config") or {}
  src = _Source(tensors, origin)
  # Vision (HF CLIPVisionConfig defaults where the config is silent).
  pe = src.require("vision_model.embeddings.patch_embedding.weight")
  width, patch = pe.shape[0], pe.shape[-1]
  pos_key = "vision_model.embeddings.position_embedding.weight"
  pos_grid = _square_grid(src.require(pos_key).shape[0], pos_key, origin)
  layers = _count_blocks(list(tensors), "vision_model.encoder.layers.", 3)
  mlp_dim = src.require("vision_model.encoder.layers.0.mlp.fc1.weight").shape[0]
  output_dim = src.require("visual_projection.weight").shape[0]
  vcfg = {"kind": "vit", "patch_size": patch, "width": width, "layers": layers,
          "heads": vc.get("num_attention_heads", 12), "output_dim": output_dim,
          "pos_grid": pos_grid, "mlp_dim": mlp_dim, "act": vc.get("hidden_act", "quick_gelu"),
          "ln_epsilon": vc.get("layer_norm_eps", 1e-5), "num_modalities": num_modalities}
  vparams = {
      "patch_embed": _stack({"kernel": _conv(src, "vision_model.embeddings.patch_embedding.weight",
                                             (width, 3, patch, patch))}, num_modalities),
      "class_embedding": src.take("vision_model.embeddings.class_embedding", (width,)),
      "positional_embedding": src.take(pos_key, (pos_grid ** 2 + 1, width)),
      "ln_pre": _ln(src, "vision_model.pre_layrnorm", width),
      "transformer": _hf_blocks(src, "vision_model.encoder", layers, width, mlp_dim),
      "ln_post": _ln(src, "vision_model.post_layernorm", width),
      "proj": src.take("visual_projection.weight", (output_dim, width)).T,
  }
  # Text.
  twidth = src.require("text_model.final_layer_norm.weight").shape[0]
  vocab = src.require("text_model.embeddings.token_embedding.weight").shape[0]
  ctx = src.require("text_model.embeddings.position_embedding.weight").shape[0]
  tlayers = _count_blocks(list(tensors), "text_model.encoder.layers.", 3)
  tmlp = src.require("text_model.encoder.layers.0.mlp.fc1.weight").shape[0]
  embed = src.require("text_projection.weight").shape[0]
  eos = tc.get("eos_token_id", 49407)
  tcfg = {"vocab_size": vocab, "context_length": ctx, "width": twidth, "layers": tlayers,
          "heads": tc.get("num_attention_heads", 8), "embed_dim": embed, "mlp_dim": tmlp,
          "act": tc.get("hidden_act", "quick_gelu"), "ln_epsilon": tc.get("layer_norm_eps", 1e-5),
          # HF keeps argmax for legacy configs whose eos_token_id is 2 (transformers PR 24773).
          "eos_token_id": None if eos == 2 else int(eos)}
  tparams = {
      "token_embedding": {"embedding": src.take("text_model.embeddings.token_embedding.weight",
                                                (vocab, twidth))},
      "positional_embedding": src.take("text_model.embeddings.position_embedding.weight",
                                       (ctx, twidth)),
      "transformer": _hf_blocks(src, "text_model.encoder", tlayers, twidth, tmlp),
      "ln_final": _ln(src, "text_model.final_layer_norm", twidth),
      "text_projection": src.take("text_projection.weight", (embed, twidth)).T,
  }
  logit_scale = src.take("logit_scale", ())
  src.finish(lambda k: bool(_HF_IGNORED.search(k)), _describe(vcfg, tcfg))
  return _finalise(vcfg, tcfg, vparams, None, tparams, float(logit_scale), origin)


# --- towers ------------------------------------------------------------------------------------------

def build_vision_tower(vision_config: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """The Flax vision tower for a CLIPWeights.vision_config.

  overrides set options that do not change the parameters, e.g. last_stride=1,
  interpolation='bilinear', dtype=jnp.bfloat16, patch_stride=12 (ViT).
  """
  cfg = dict(vision_config)
  arch = cfg.pop("kind", None)
  cfg.update(overrides)
  if arch == "resnet":
    cfg["layers"] = tuple(cfg["layers"])
    cls = ModifiedResNet
  elif arch == "vit":
    cls = VisionTransformer
  else:
    raise ValueError(f"vision_config['kind'] must be 'resnet' or 'vit', got {arch!r}")
  return _construct(cls, cfg)


def build_text_tower(text_config: Mapping[str, Any], **overrides: Any) -> nn.Module:
  """The Flax text tower for a CLIPWeights.text_config (overrides: dtype, attention_impl)."""
  return _construct(TextTransformer, {**text_config, **overrides})


def _construct(cls, cfg: dict) -> nn.Module:
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f"{cls.__name__} has no option(s) {unknown}; options: {sorted(fields)}")
  return cls(**cfg)


def _example_inputs(vision_config: Mapping[str, Any]) -> tuple:
  if vision_config["kind"] == "resnet":
    side = vision_config["pos_grid"] * 32
  else:
    side = vision_config["pos_grid"] * vision_config["patch_size"]
  m = vision_config["num_modalities"]
  return (jnp.zeros((1, side, side, 3), jnp.float32), jnp.zeros((1,), jnp.int32) if m > 1 else None)


def _shapes(tree: Tree) -> dict[str, tuple]:
  return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _check_against_module(module: nn.Module, args: tuple, variables: Tree, what: str) -> None:
  """The converted tree must have exactly the module's variable paths and shapes."""
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  exp, got = _shapes(flax.core.unfreeze(expected)), _shapes(variables)
  if exp != got:
    diff = sorted(set(exp.items()) ^ set(got.items()))
    raise CheckpointError(f"{what}: converted variables differ from the module's: "
                          + _listing([f"{k} {s}" for k, s in diff], "differences"))


def _describe(vcfg: dict, tcfg: dict) -> str:
  if vcfg["kind"] == "resnet":
    v = (f"ModifiedResNet layers={tuple(vcfg['layers'])} width={vcfg['width']} "
         f"output_dim={vcfg['output_dim']} pos_grid={vcfg['pos_grid']}")
  else:
    v = (f"ViT patch={vcfg['patch_size']} width={vcfg['width']} layers={vcfg['layers']} "
         f"heads={vcfg['heads']} output_dim={vcfg['output_dim']} pos_grid={vcfg['pos_grid']}")
  t = (f"text width={tcfg['width']} layers={tcfg['layers']} heads={tcfg['heads']} "
       f"context={tcfg['context_length']} vocab={tcfg['vocab_size']}")
  return f"{v}; {t}"


def _finalise(vcfg, tcfg, vparams, vstats, tparams, logit_scale, origin) -> CLIPWeights:
  w = CLIPWeights(vcfg, tcfg, vparams, vstats, tparams, logit_scale, origin)
  _check_against_module(build_vision_tower(vcfg), _example_inputs(vcfg), w.vision_variables(),
                        f"{origin} (vision)")
  _check_against_module(build_text_tower(tcfg), (jnp.zeros((1, tcfg["context_length"]), jnp.int32),),
                        w.text_variables(), f"{origin} (text)")
  return w


# --- entry points -------------------------------------------------------------------------------------

def load_clip(path: str, *, num_modalities: int = 2) -> CLIPWeights:
  """CLIP weights from an OpenAI-format file, a Hugging Face folder or a save_converted folder.

  num_modalities: copies of the stem / patch embedding to make (ignored for a converted folder,
  which keeps the number it was saved with).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise CheckpointError(f"{path}: a checkpoint folder needs config.json")
    with open(cfg_path) as f:
      config = json.load(f)
    if config.get("format") == CONVERTED_FORMAT:
      return load_converted(path)
    config, tensors = read_hf_folder(path)
    return convert_hf_clip(config, tensors, num_modalities=num_modalities, origin=path)
  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint not found: {path}")
  return convert_openai_state_dict(read_state_dict(path), num_modalities=num_modalities,
                                   origin=path)


def save_converted(weights: CLIPWeights, out: str, *, overwrite: bool = False) -> None:
  """Writes `out`/config.json and `out`/params.msgpack (flax msgpack); load_converted reads them
  back without torch."""
  out = os.fspath(out)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; choose another folder or overwrite")
  os.makedirs(out, exist_ok=True)
  config = {"format": CONVERTED_FORMAT, "version": CONVERTED_VERSION,
            "vision_config": weights.vision_config, "text_config": weights.text_config,
            "logit_scale": weights.logit_scale, "source": weights.source}
  payload = {"vision": weights.vision_variables(), "text": weights.text_variables()}
  with open(os.path.join(out, CONVERTED_PARAMS), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, payload)))
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)


def load_converted(path: str) -> CLIPWeights:
  """Reads a folder written by save_converted."""
  path = os.fspath(path)
  cfg_path = os.path.join(path, "config.json")
  params_path = os.path.join(path, CONVERTED_PARAMS)
  for p in (cfg_path, params_path):
    if not os.path.isfile(p):
      raise CheckpointError(f"{path}: not a converted CLIP folder ({os.path.basename(p)} missing)")
  with open(cfg_path) as f:
    config = json.load(f)
  if config.get("format") != CONVERTED_FORMAT or config.get("version") != CONVERTED_VERSION:
    raise CheckpointError(f"{cfg_path}: format {config.get('format')!r} version "
                          f"{config.get('version')!r}, expected {CONVERTED_FORMAT!r} "
                          f"version {CONVERTED_VERSION}")
  with open(params_path, "rb") as f:
    payload = flax.serialization.msgpack_restore(f.read())
  vision = payload["vision"]
  return _finalise(config["vision_config"], config["text_config"], vision["params"],
                   vision.get("batch_stats"), payload["text"]["params"],
                   float(config["logit_scale"]), config.get("source") or path)


# --- partial loading ------------------------------------------------------------------------------------

@dataclasses.dataclass
class MergeReport:
  loaded: list[str]    # target paths copied from the source
  fresh: list[str]     # target paths (under target_prefix) left as they were
  skipped: list[str]   # source paths not selected by any regex


def merge_params(target: Tree, source: Tree, include: Iterable[str], *, what: str = "params",
                 target_prefix: str = "", return_report: bool = False):
  """Copies the leaves of `source` whose '/'-joined path matches any regex of `include`
  (re.search) into `target` at target_prefix + path; returns the new tree (and a MergeReport if
  return_report). `what` names the trees in messages and the log.

  Errors (ValueError, listing all offenders): a regex that selects nothing, a selected source
  leaf with no counterpart in target, or a shape mismatch. Copied leaves take the target's dtype.
  The report (loaded / left fresh) is logged at INFO level.
  """
  if isinstance(include, str):
    raise TypeError("include must be a sequence of regexes, not one string")
  patterns = [re.compile(r) for r in include]
  if not patterns:
    raise ValueError(f"merge_params ({what}): include is empty, nothing would be loaded")
  frozen = isinstance(target, flax.core.FrozenDict)
  flat_t = traverse_util.flatten_dict(flax.core.unfreeze(target), sep="/")
  flat_s = traverse_util.flatten_dict(flax.core.unfreeze(source), sep="/")
  loaded, skipped, absent, mismatched = [], [], [], []
  used = [False] * len(patterns)
  new = dict(flat_t)
  for path, value in flat_s.items():
    hits = [i for i, p in enumerate(patterns) if p.search(path)]
    if not hits:
      skipped.append(path)
      continue
    for i in hits:
      used[i] = True
    tpath = target_prefix + path
    if tpath not in flat_t:
      absent.append(tpath)
      continue
    if tuple(np.shape(value)) != tuple(np.shape(flat_t[tpath])):
      mismatched.append(f"{tpath} source {tuple(np.shape(value))} target "
                        f"{tuple(np.shape(flat_t[tpath]))}")
      continue
    new[tpath] = jnp.asarray(value, dtype=jnp.asarray(flat_t[tpath]).dtype)
    loaded.append(tpath)
  problems = []
  unused = [p.pattern for p, u in zip(patterns, used) if not u]
  if unused:
    problems.append(f"regexes selecting no source leaf: {unused}")
  if absent:
    problems.append(_listing(absent, "selected source leaves missing from the target"))
  if mismatched:
    problems.append(_listing(mismatched, "shape mismatches"))
  if problems:
    raise ValueError(f"merge_params ({what}): " + "; ".join(problems))
  loaded_set = set(loaded)
  fresh = [p for p in flat_t if p.startswith(target_prefix) and p not in loaded_set]
  logging.info("merge_params (%s): loaded %d leaves, left %d fresh: %s", what, len(loaded),
               len(fresh), fresh[:_MAX_LISTED])
  tree = traverse_util.unflatten_dict(new, sep="/")
  tree = flax.core.freeze(tree) if frozen else tree
  if return_report:
    return tree, MergeReport(loaded, fresh, skipped)
  return tree


def count_params(tree: Tree) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))
