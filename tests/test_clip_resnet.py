"""ModifiedResNet against OpenAI's clip/model.py (random weights, converted through eees_jax.weights)."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
import optax

from eees_jax.models import layers as L
from eees_jax import weights as W
from eees_jax.models import towers
from eees_jax.models.clip_resnet import ModifiedResNet
from _torch_refs import interpolate_pos, resnet_features, tiny_clip


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def small():
  """layers (2,1,1,1), width 16 (pool width 512, 8 heads), stored pool grid 2 (input 64)."""
  model = tiny_clip((2, 1, 1, 1), 16, 64)
  weights = W.convert_openai_state_dict(
      {k: v.numpy() for k, v in model.state_dict().items()}, num_modalities=1)
  return model, weights


def test_parity_native_grid(small):
  model, weights = small
  x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref_pooled = model.visual(x).numpy()
    ref_map = resnet_features(model.visual, x).numpy().transpose(0, 2, 3, 1)
  out = jax.jit(towers.build_vision_tower(weights.vision_config).apply)(weights.vision_variables(),
                                                                  nhwc(x))
  assert out["map"].shape == (3, 2, 2, 512)
  assert rel_err(out["map"], ref_map) < 1e-4
  assert rel_err(out["pooled"], ref_pooled) < 1e-4


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_parity_interpolated_pool_grid(small, mode):
  """96x64 input -> 3x2 feature grid; torch oracle resizes the embedding with F.interpolate."""
  model, weights = small
  x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(2))
  pos = model.visual.attnpool.positional_embedding.data.clone()
  try:
    with torch.no_grad():
      model.visual.attnpool.positional_embedding.data = interpolate_pos(pos, 2, (3, 2), mode)
      ref = model.visual(x).numpy()
  finally:
    model.visual.attnpool.positional_embedding.data = pos
  tower = towers.build_vision_tower(weights.vision_config, interpolation=mode)
  out = jax.jit(tower.apply)(weights.vision_variables(), nhwc(x))
  assert out["map"].shape == (2, 3, 2, 512)
  assert rel_err(out["pooled"], ref) < 1e-4


def test_interpolation_identity_when_grid_unchanged():
  pos = jax.random.normal(jax.random.key(0), (50, 8))
  for method in ("bicubic", "bilinear"):
    np.testing.assert_array_equal(L.resize_token_pos_embed(pos, (7, 7), 7, method), pos)
    # The resampling matrices themselves are the identity at scale 1 (no special case needed).
    np.testing.assert_allclose(L.interpolation_matrix(7, 7, method), np.eye(7), atol=1e-7)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_interpolation_matrix_matches_torch(mode):
  grid = torch.randn(1, 3, 7, 7, generator=torch.Generator().manual_seed(3))
  for out_hw in [(18, 9), (4, 3), (7, 12)]:
    ref = torch.nn.functional.interpolate(grid, size=out_hw, mode=mode, align_corners=False)
    got = L.resize_grid(jnp.asarray(grid[0].numpy().transpose(1, 2, 0)), out_hw, mode)
    np.testing.assert_allclose(np.asarray(got), ref[0].numpy().transpose(1, 2, 0), atol=1e-5)


def test_last_stride_one_doubles_map(small):
  model, weights = small
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
  block = model.visual.layer4[0]
  saved = block.avgpool, block.downsample[0]
  try:  # torch oracle: layer4's anti-aliasing pools removed (stride 1).
    block.avgpool, block.downsample[0] = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
      pos = model.visual.attnpool.positional_embedding.data
      ref_map = resnet_features(model.visual, x).numpy().transpose(0, 2, 3, 1)
      attn_pos = interpolate_pos(pos, 2, (4, 4), "bicubic")
      model.visual.attnpool.positional_embedding.data = attn_pos
      ref_pooled = model.visual.attnpool(torch.from_numpy(ref_map.transpose(0, 3, 1, 2))).numpy()
      model.visual.attnpool.positional_embedding.data = pos
  finally:
    block.avgpool, block.downsample[0] = saved
  tower = towers.build_vision_tower(weights.vision_config, last_stride=1)
  out = jax.jit(tower.apply)(weights.vision_variables(), nhwc(x))
  assert out["map"].shape == (2, 4, 4, 512)
  assert rel_err(out["map"], ref_map) < 1e-4
  assert rel_err(out["pooled"], ref_pooled) < 1e-4


def test_train_mode_matches_torch(small):
  """Training-mode BatchNorm (batch statistics) gives torch's train-mode forward."""
  model, weights = small
  x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
  model.train()
  try:
    with torch.no_grad():
      snapshot = {k: v.clone() for k, v in model.state_dict().items()}
      ref = model.visual(x).numpy()
      model.load_state_dict(snapshot)
  finally:
    model.eval()
  tower = towers.build_vision_tower(weights.vision_config)
  out, _ = jax.jit(lambda v, x: tower.apply(v, x, train=True, mutable=["batch_stats"]))(
      weights.vision_variables(), nhwc(x))
  assert rel_err(out["pooled"], ref) < 1e-4


def test_rn50_shaped_parity():
  """RN50's layer counts and widths (3-4-6-3, width 64, 32 heads) at a small 64x64 input."""
  model = tiny_clip((3, 4, 6, 3), 64, 64, embed_dim=64, seed=7)
  weights = W.convert_openai_state_dict(
      {k: v.numpy() for k, v in model.state_dict().items()}, num_modalities=1)
  assert weights.vision_config["heads"] == 32 and weights.vision_config["layers"] == [3, 4, 6, 3]
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
  with torch.no_grad():
    ref = model.visual(x).numpy()
  out = jax.jit(towers.build_vision_tower(weights.vision_config).apply)(weights.vision_variables(),
                                                                    nhwc(x))
  assert out["map"].shape == (2, 2, 2, 2048)
  assert rel_err(out["pooled"], ref) < 1e-4


@pytest.fixture(scope="module")
def two_stems(small):
  """The small model's weights converted with visible and infrared stems."""
  model, _ = small
  return W.convert_openai_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                     num_modalities=2)


def test_stems_start_equal_at_random_init():
  tower = ModifiedResNet(layers=(1, 1, 1, 1), width=8, output_dim=16, heads=4, pos_grid=1)
  x = jnp.zeros((2, 32, 32, 3))
  v = jax.jit(tower.init)(jax.random.key(0), x, jnp.array([0, 1], jnp.int32))
  for leaf in jax.tree.leaves(v["params"]["stem"]) + jax.tree.leaves(v["batch_stats"]["stem"]):
    assert leaf.shape[0] == 2
    np.testing.assert_array_equal(leaf[0], leaf[1])


def test_converted_stems_equal_and_select_per_sample(small, two_stems):
  _, one = small
  v = two_stems.vision_variables()
  for a, b in zip(jax.tree.leaves(v["params"]["stem"]), jax.tree.leaves(one.vision_params["stem"])):
    np.testing.assert_array_equal(a, np.concatenate([b, b]))
  x = jnp.asarray(np.random.RandomState(1).randn(4, 64, 64, 3).astype(np.float32))
  modality = jnp.array([0, 1, 0, 1], jnp.int32)
  # Make the infrared stem different; oracle: a one-stem tower holding either stem.
  stem = jax.tree.map(lambda a: jnp.asarray(a).at[1].multiply(1.5), v["params"]["stem"])
  params = {**v["params"], "stem": stem}
  tower = towers.build_vision_tower(two_stems.vision_config)
  out = jax.jit(tower.apply)({**v, "params": params}, x, modality)
  single = jax.jit(towers.build_vision_tower(one.vision_config).apply)
  for m in (0, 1):
    pick = lambda tree: jax.tree.map(lambda a: a[m:m + 1], tree)
    variables = {"params": {**params, "stem": pick(stem)},
                 "batch_stats": {**v["batch_stats"], "stem": pick(v["batch_stats"]["stem"])}}
    ref = single(variables, x)
    rows = np.where(np.asarray(modality) == m)[0]
    assert rel_err(out["pooled"][rows], ref["pooled"][rows]) < 1e-5
    other = np.where(np.asarray(modality) != m)[0]
    assert rel_err(out["pooled"][other], ref["pooled"][other]) > 1e-3


@pytest.mark.parametrize("mixed", [False, True])
def test_sgd_step_on_infrared_loss_moves_only_infrared_stem(two_stems, mixed):
  """Train mode, batch of infrared images only (mixed=False), or eval mode with a mixed batch and
  a loss on the infrared samples only (mixed=True): the visible stem gets no update."""
  tower = towers.build_vision_tower(two_stems.vision_config)
  v = two_stems.vision_variables()
  x = jnp.asarray(np.random.RandomState(2).randn(4, 64, 64, 3).astype(np.float32))
  modality = jnp.array([0, 1, 0, 1] if mixed else [1, 1, 1, 1], jnp.int32)
  weight = (modality == 1).astype(jnp.float32)

  def loss_fn(params):
    if mixed:
      out = tower.apply({**v, "params": params}, x, modality, train=False)
    else:
      out, _ = tower.apply({**v, "params": params}, x, modality, train=True,
                           mutable=["batch_stats"])
    return (jnp.sum(weight[:, None] * out["pooled"] ** 2)
            + 1e-3 * jnp.sum(weight[:, None, None, None] * out["map"] ** 2))

  grads = jax.jit(jax.grad(loss_fn))(v["params"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  opt = optax.sgd(0.1)
  updates, _ = opt.update(grads, opt.init(v["params"]))
  new = optax.apply_updates(v["params"], updates)
  moved = []
  for old, upd in zip(jax.tree.leaves(v["params"]["stem"]), jax.tree.leaves(new["stem"])):
    np.testing.assert_array_equal(upd[0], old[0])
    moved.append(np.abs(upd[1] - old[1]).max())
  assert min(moved) > 0
  assert np.abs(new["layer1_0"]["conv1"]["kernel"] - v["params"]["layer1_0"]["conv1"]["kernel"]
                ).max() > 0


def test_masked_batch_norm_statistics():
  """Oracle: numpy statistics over the selected samples only; an empty mask changes nothing."""
  bn = L.MaskedBatchNorm(use_running_average=False)
  x = np.random.RandomState(0).randn(5, 3, 2, 4).astype(np.float32) * 2 + 1
  mask = np.array([True, False, True, True, False])
  v = bn.init(jax.random.key(0), x, mask)
  y, upd = bn.apply(v, x, mask, mutable=["batch_stats"])
  sel = x[mask]
  mean, var = sel.mean(axis=(0, 1, 2)), sel.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
  y0, upd0 = bn.apply(v, x, np.zeros(5, bool), mutable=["batch_stats"])
  assert np.isfinite(y0).all()
  np.testing.assert_array_equal(upd0["batch_stats"]["mean"], v["batch_stats"]["mean"])
  np.testing.assert_array_equal(upd0["batch_stats"]["var"], v["batch_stats"]["var"])


@pytest.mark.parametrize("mask", [[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
def test_batch_norm_train_gradient_matches_autodiff(mask):
  """The written-out backward of layers.batch_norm_train against jax.grad of the plain formula
  (sums as reductions), with cotangents on y, on the mean and on the variance."""
  rng = np.random.RandomState(5)
  x = jnp.asarray(rng.randn(6, 3, 2, 5).astype(np.float32) * 3 + 1)
  w = jnp.asarray(mask, jnp.float32)
  scale = jnp.asarray(rng.randn(5).astype(np.float32))
  bias = jnp.asarray(rng.randn(5).astype(np.float32))

  def plain(x, scale, bias):
    ww = w[:, None, None, None]
    n = jnp.maximum(jnp.sum(w) * 6, 1.0)
    mean = jnp.sum(x * ww, axis=(0, 1, 2)) / n
    var = jnp.sum(jnp.square(x - mean) * ww, axis=(0, 1, 2)) / n
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

  # A cotangent on y that varies per element and with y, well conditioned even where y is large
  # (an empty mask normalises with variance 0, so y reaches ~1e3 and sin(y) would amplify rounding).
  ct = jnp.asarray(rng.randn(*x.shape).astype(np.float32))

  def loss(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias)[:3]
      return (jnp.sum(ct * y + 0.05 * jnp.square(y)) + jnp.sum(2.0 * mean)
              + jnp.sum(jnp.cos(var)))
    return f

  ours = lambda x, s, b: L.batch_norm_train(x, w, s, b, 1e-5)
  for got, want in zip(ours(x, scale, bias), plain(x, scale, bias)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g_got = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
  g_want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, scale, bias)
  for got, want in zip(g_got, g_want):
    assert np.isfinite(got).all()
    # Float rounding relative to the gradient's scale (about 1e4 with an empty mask: variance 0).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + np.abs(want).max()))


def test_bfloat16_compute_close_to_float32(small):
  _, weights = small
  x = jnp.asarray(np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32))
  ref = jax.jit(towers.build_vision_tower(weights.vision_config).apply)(weights.vision_variables(), x)
  tower = towers.build_vision_tower(weights.vision_config, dtype=jnp.bfloat16)
  out = jax.jit(tower.apply)(weights.vision_variables(), x)
  assert out["pooled"].dtype == jnp.bfloat16 and out["map"].dtype == jnp.bfloat16
  assert rel_err(out["pooled"].astype(jnp.float32), ref["pooled"]) < 5e-2


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 0), (2, 1)])
def test_conv2d_1x1_matmul_matches_lax_conv(stride, pad):
  """The matmul form of a 1x1 convolution against lax.conv_general_dilated, values and gradients."""
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(2, 7, 6, 5).astype(np.float32))
  k = jnp.asarray(rng.randn(1, 1, 5, 3).astype(np.float32))
  padding = ((pad, pad), (pad, pad))

  def ref(x, k):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  got = L.conv2d(x, k, (stride, stride), padding)
  want = ref(x, k)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.randn(*want.shape).astype(np.float32))
  g_got = jax.grad(lambda x, k: jnp.sum(L.conv2d(x, k, (stride, stride), padding) * cot),
                   argnums=(0, 1))(x, k)
  g_want = jax.grad(lambda x, k: jnp.sum(ref(x, k) * cot), argnums=(0, 1))(x, k)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,kernel,stride,pad", [
    ((2, 4, 2, 5), (3, 3), 1, 1),    # the synthetic model's last stage: conv2d takes this path
    ((2, 2, 4, 5), (3, 3), 1, 1),
    ((2, 7, 6, 5), (3, 3), 2, 1),    # larger maps, strides, uneven kernels: patch_matmul directly
    ((2, 9, 5, 5), (3, 2), 1, 0),
    ((1, 6, 6, 4), (5, 5), 2, 2)])
def test_patch_matmul_matches_lax_conv(shape, kernel, stride, pad):
  """The one-matmul form of a convolution against lax.conv_general_dilated, values and gradients;
  conv2d uses it exactly when the map has fewer positions than the kernel."""
  rng = np.random.RandomState(6)
  x = jnp.asarray(rng.randn(*shape).astype(np.float32))
  k = jnp.asarray(rng.randn(*kernel, shape[-1], 3).astype(np.float32))
  strides, padding = (stride, stride), ((pad, pad), (pad, pad))

  def ref(x, k):
    return jax.lax.conv_general_dilated(x, k, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  small = shape[1] * shape[2] < kernel[0] * kernel[1]
  assert ("dot_general" in str(jax.make_jaxpr(L.conv2d, static_argnums=(2, 3))(
      x, k, strides, padding))) == small
  want = ref(x, k)
  for f in (L.patch_matmul, L.conv2d):
    got = f(x, k, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(rng.randn(*want.shape).astype(np.float32))
  g_got = jax.grad(lambda x, k: jnp.sum(L.patch_matmul(x, k, strides, padding) * cot),
                   argnums=(0, 1))(x, k)
  g_want = jax.grad(lambda x, k: jnp.sum(ref(x, k) * cot), argnums=(0, 1))(x, k)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_modality_counts_matches_whole_batch_stems():
  """Stems on their own slices (static layout) against stems on the whole batch with masked BN:
  same outputs, running statistics and gradients in training, also with an absent modality."""
  tower = ModifiedResNet(layers=(1, 1, 1, 1), width=8, output_dim=16, heads=4, pos_grid=1)
  rng = np.random.RandomState(5)
  x = jnp.asarray(rng.randn(5, 32, 32, 3).astype(np.float32))
  v = tower.init(jax.random.key(0), x, jnp.zeros(5, jnp.int32))
  # Distinct stems and non-zero residual branches, so a wrong stem or slice shows.
  params = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.randn(*a.shape), a.dtype), v["params"])

  def run(modality, counts):
    def loss(p):
      out, upd = tower.apply({"params": p, "batch_stats": v["batch_stats"]}, x, modality,
                             train=True, modality_counts=counts, mutable=["batch_stats"])
      return jnp.sum(out["pooled"] ** 2) + jnp.sum(out["map"] ** 2), (out, upd)
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  modality = jnp.asarray([0, 0, 0, 1, 1], jnp.int32)
  g_ref, (out_ref, upd_ref) = run(modality, None)
  g, (out, upd) = run(modality, (3, 2))
  assert rel_err(out["map"], out_ref["map"]) < 1e-5
  assert rel_err(out["pooled"], out_ref["pooled"]) < 1e-5
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g["stem"]), jax.tree.leaves(g_ref["stem"])):
    assert rel_err(a, b) < 1e-4
  assert rel_err(g["layer1_0"]["conv1"]["kernel"], g_ref["layer1_0"]["conv1"]["kernel"]) < 1e-4
  # Infrared only: the visible stem is skipped and its running statistics stay as they were.
  ir = jnp.ones(5, jnp.int32)
  apply = jax.jit(lambda m, c: tower.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                           m, train=True, modality_counts=c,
                                           mutable=["batch_stats"]), static_argnums=1)
  (out_ref, upd_ref), (out, upd) = apply(ir, None), apply(ir, (0, 5))
  assert rel_err(out["pooled"], out_ref["pooled"]) < 1e-5
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(upd["batch_stats"]["stem"]["bn1"]["mean"][0],
                                v["batch_stats"]["stem"]["bn1"]["mean"][0])
  with pytest.raises(ValueError, match="modality_counts"):
    tower.apply(v, x, modality, modality_counts=(4, 2))
