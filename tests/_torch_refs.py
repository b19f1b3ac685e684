"""Test helper: OpenAI's CLIP model definition (clip/model.py of clip-anytorch), loaded by file path.

clip/__init__.py imports torchvision, which the project does not install, so the package cannot be
imported normally; model.py itself needs only torch and numpy. Also builds small random CLIP models
whose every parameter and BatchNorm statistic is random (CLIP's own initialisation zeroes some).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np


def clip_package_dir() -> str:
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("clip-anytorch is not installed (requirements-nodeps.txt)")
  return list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=None)
def _load(name: str):
  path = os.path.join(clip_package_dir(), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_openai_clip_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def clip_model():
  """OpenAI's clip/model.py as a module (CLIP, ModifiedResNet, VisionTransformer, ...)."""
  return _load("model")


def simple_tokenizer():
  """OpenAI's clip/simple_tokenizer.py (needs ftfy and regex)."""
  return _load("simple_tokenizer")


def randomize_(model, seed: int = 0, scale: float = 0.1) -> None:
  """Every parameter and floating buffer random (BN running var positive), in place."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * scale)
      if name.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight")):
        p.add_(1.0)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(torch.randn(b.shape, generator=gen) * scale)
      elif name.endswith("running_var"):
        b.copy_(torch.rand(b.shape, generator=gen) + 0.5)


def to_numpy_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def tiny_clip(vision_layers, vision_width: int, image_resolution: int, patch_size=None,
              embed_dim: int = 32, context_length: int = 16, vocab_size: int = 100,
              text_width: int = 128, text_layers: int = 1, seed: int = 0):
  """A small OpenAI CLIP (eval mode) with random weights and BN statistics.

  Heads follow OpenAI's build_model rule (width / 64; RN pool 32 * width / 64) so that the state
  dict converts with inferred heads.
  """
  import torch
  torch.manual_seed(seed)
  model = clip_model().CLIP(embed_dim, image_resolution, vision_layers, vision_width, patch_size,
                            context_length, vocab_size, text_width, text_width // 64, text_layers)
  randomize_(model, seed)
  return model.eval()


def resnet_features(visual, x):
  """torch ModifiedResNet up to layer4 (the map before attention pooling), NCHW."""
  v = visual
  x = v.relu1(v.bn1(v.conv1(x)))
  x = v.relu2(v.bn2(v.conv2(x)))
  x = v.relu3(v.bn3(v.conv3(x)))
  x = v.avgpool(x)
  return v.layer4(v.layer3(v.layer2(v.layer1(x))))


def interpolate_pos(pos, grid: int, out_hw, mode: str):
  """Torch oracle: CLIP positional embedding [1 + g*g, C] resized with F.interpolate."""
  import torch
  import torch.nn.functional as F
  c = pos.shape[-1]
  g = pos[1:].reshape(1, grid, grid, c).permute(0, 3, 1, 2)
  g = F.interpolate(g, size=tuple(out_hw), mode=mode, align_corners=False)
  return torch.cat([pos[:1], g.permute(0, 2, 3, 1).reshape(-1, c)], dim=0)
