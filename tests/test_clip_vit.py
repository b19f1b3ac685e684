"""VisionTransformer against OpenAI's clip/model.py (random weights, converted through eees_jax.weights)."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from eees_jax import weights as W
from eees_jax.models import towers
from eees_jax.models.clip_vit import VisionTransformer
from _torch_refs import interpolate_pos, tiny_clip


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def tiny():
  """width 128 (2 heads), 2 layers, patch 8, stored grid 4x4 (input 32)."""
  model = tiny_clip(2, 128, 32, patch_size=8)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, W.convert_openai_state_dict(sd, num_modalities=1), \
      W.convert_openai_state_dict(sd, num_modalities=2)


def torch_cls_and_pooled(visual, x):
  proj = visual.proj
  with torch.no_grad():
    pooled = visual(x).numpy()
    visual.proj = None
    try:
      cls = visual(x).numpy()
    finally:
      visual.proj = proj
  return cls, pooled


def test_parity_native_grid(tiny):
  model, weights, _ = tiny
  assert weights.vision_config["heads"] == 2
  x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
  ref_cls, ref_pooled = torch_cls_and_pooled(model.visual, x)
  tower = towers.build_vision_tower(weights.vision_config)
  out = jax.jit(tower.apply)(weights.vision_variables(), nhwc(x))
  assert out["cls"].shape == (3, 128) and out["pooled"].shape == (3, 32)
  assert rel_err(out["cls"], ref_cls) < 1e-4
  assert rel_err(out["pooled"], ref_pooled) < 1e-4


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("stride", [None, 4])
def test_parity_interpolated_grid_and_overlapping_patches(tiny, mode, stride):
  """48x32 input: 6x4 grid (patch stride 8) or 11x7 (overlapping, stride 4). Torch oracle: conv1
  stride changed and the positional embedding resized with F.interpolate."""
  model, weights, _ = tiny
  visual = model.visual
  x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(2))
  s = stride or 8
  grid = ((48 - 8) // s + 1, (32 - 8) // s + 1)
  pos = visual.positional_embedding.data.clone()
  try:
    visual.conv1.stride = (s, s)
    visual.positional_embedding.data = interpolate_pos(pos, 4, grid, mode)
    ref_cls, ref_pooled = torch_cls_and_pooled(visual, x)
  finally:
    visual.conv1.stride = (8, 8)
    visual.positional_embedding.data = pos
  tower = towers.build_vision_tower(weights.vision_config, interpolation=mode, patch_stride=stride)
  out = jax.jit(tower.apply)(weights.vision_variables(), nhwc(x))
  assert rel_err(out["cls"], ref_cls) < 1e-4
  assert rel_err(out["pooled"], ref_pooled) < 1e-4


def test_patch_embeddings_start_equal_and_select_per_sample(tiny):
  tower = VisionTransformer(patch_size=4, width=16, layers=1, heads=2, output_dim=8, pos_grid=2)
  v = jax.jit(tower.init)(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), jnp.array([0, 1]))
  kernel = v["params"]["patch_embed"]["kernel"]
  assert kernel.shape == (2, 4, 4, 3, 16)
  np.testing.assert_array_equal(kernel[0], kernel[1])

  _, one, two = tiny
  x = jnp.asarray(np.random.RandomState(3).randn(4, 32, 32, 3).astype(np.float32))
  modality = jnp.array([1, 0, 0, 1], jnp.int32)
  params = dict(two.vision_params)
  params["patch_embed"] = {"kernel": jnp.asarray(params["patch_embed"]["kernel"]).at[1].multiply(-1)}
  out = jax.jit(towers.build_vision_tower(two.vision_config).apply)({"params": params}, x, modality)
  single = jax.jit(towers.build_vision_tower(one.vision_config).apply)
  for m in (0, 1):
    p1 = {**params, "patch_embed": {"kernel": params["patch_embed"]["kernel"][m:m + 1]}}
    ref = single({"params": p1}, x)
    rows = np.asarray(modality) == m
    assert rel_err(out["pooled"][rows], ref["pooled"][rows]) < 1e-5
    assert rel_err(out["pooled"][~rows], ref["pooled"][~rows]) > 1e-3


def test_bad_patch_stride(tiny):
  _, weights, _ = tiny
  tower = towers.build_vision_tower(weights.vision_config, patch_stride=9)
  with pytest.raises(ValueError, match="patch_stride"):
    tower.apply(weights.vision_variables(), jnp.zeros((1, 32, 32, 3)))
