"""Layers shared by the CLIP towers: transformer blocks, masked batch norm, positional resizing.

All modules take a compute `dtype` (e.g. bfloat16) and keep parameters in `param_dtype` (float32);
normalisation statistics and softmax are computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# torch's default nn.Linear / nn.Conv2d initialisation (kaiming_uniform with a=sqrt(5)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# --- positional-embedding resizing ------------------------------------------------------------------

def _cubic_weight(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel with torch's a = -0.75."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def interpolation_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """[out_size, in_size] matrix M with resized = M @ signal, as torch F.interpolate does it.

  Matches torch.nn.functional.interpolate(mode='bilinear' | 'bicubic', align_corners=False,
  antialias=False) along one axis, which is how PyTorch VI-ReID / CLIP-ReID code resizes CLIP's
  positional embeddings (half-pixel centres; bicubic a = -0.75 with edge-clamped taps; bilinear
  clamps negative source coordinates to 0). jax.image.resize differs (a = -0.5, antialiasing when
  shrinking), so loading a PyTorch-trained model would not reproduce its features.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = (dst + 0.5) * scale - 0.5
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if method == "bilinear":
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
  elif method == "bicubic":
    i0 = np.floor(src).astype(np.int64)
    t = src - i0
    for offset in (-1, 0, 1, 2):
      idx = np.clip(i0 + offset, 0, in_size - 1)
      np.add.at(m, (rows, idx), _cubic_weight(t - offset))
  else:
    raise ValueError(f"unknown interpolation {method!r}; expected 'bicubic' or 'bilinear'")
  return m.astype(np.float32)


def resize_grid(grid: jax.Array, out_hw: tuple[int, int], method: str) -> jax.Array:
  """Resizes a [h, w, C] grid of embeddings to [H, W, C]; exactly the identity when unchanged.

  The resize is two small matrix products (precomputed at trace time), in float32.
  """
  h, w = grid.shape[:2]
  if (h, w) == tuple(out_hw):
    return grid
  mh = jnp.asarray(interpolation_matrix(h, out_hw[0], method))
  mw = jnp.asarray(interpolation_matrix(w, out_hw[1], method))
  return jnp.einsum("Hh,Ww,hwc->HWc", mh, mw, grid.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def resize_token_pos_embed(pos: jax.Array, grid_hw: tuple[int, int], stored_grid: int,
                           method: str) -> jax.Array:
  """CLIP positional embedding [1 + g*g, C] (a leading extra token, then a row-major g x g grid)
  -> [1 + H*W, C] for an H x W token grid."""
  if pos.shape[0] != stored_grid * stored_grid + 1:
    raise ValueError(f"positional embedding has {pos.shape[0]} rows, expected "
                     f"{stored_grid}*{stored_grid}+1 for grid {stored_grid}")
  grid = pos[1:].reshape(stored_grid, stored_grid, pos.shape[-1])
  grid = resize_grid(grid, grid_hw, method)
  grid = grid.reshape(grid_hw[0] * grid_hw[1], pos.shape[-1]).astype(pos.dtype)
  return jnp.concatenate([pos[:1], grid], axis=0)


# --- convolution -------------------------------------------------------------------------------

def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
           padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
  """NHWC convolution, x [B, H, W, Cin] * kernel [kh, kw, Cin, Cout] -> [B, H', W', Cout].

  Two cases go through `patch_matmul`, one matmul over the channel axis:
  - a 1x1 kernel (stride by slicing): XLA:CPU runs dots through its fast matmul path but 1x1
    convolutions through its convolution path, 2-4x slower forward and slower still backward, where
    the kernel gradient becomes a convolution over the whole feature map behind large transposes;
  - a feature map with fewer positions than the kernel (the synthetic model's 4x2 last stage under
    a 3x3 kernel): XLA swaps the operands of such a convolution and runs the result ~15x slower
    than the same products as one matmul, forward and backward (BENCHMARKS.md, "Small feature
    maps").
  Other kernels use lax.conv_general_dilated (on CPU faster than im2col or per-tap matmul
  formulations, measured in bench/profile_train_step.py).
  """
  if kernel.shape[:2] == (1, 1) or takes_patch_matmul(x.shape[1:3], kernel.shape[:2]):
    return patch_matmul(x, kernel, strides, padding)
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def takes_patch_matmul(map_hw: tuple[int, int], kernel_hw: tuple[int, int]) -> bool:
  """Whether conv2d computes a non-1x1 kernel with `patch_matmul`: the map has fewer positions
  than the kernel, the case XLA swaps the convolution's operands for."""
  return map_hw[0] * map_hw[1] < kernel_hw[0] * kernel_hw[1]


def patch_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
                 padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
  """conv2d as one matmul: the kh*kw shifted (strided) views of the padded input side by side on
  the channel axis [B, H', W', kh*kw*Cin], times the kernel flattened to [kh*kw*Cin, Cout]."""
  kh, kw, cin, cout = kernel.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  views = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
           for i in range(kh) for j in range(kw)]
  return jnp.einsum("bhwc,cd->bhwd", jnp.concatenate(views, axis=-1),
                    kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
  """Bias-free NHWC convolution with flax.linen.Conv's variable (params/kernel [kh, kw, Cin, Cout])
  and initialisation, computed by conv2d; a drop-in for nn.Conv(use_bias=False) without groups or
  dilation, so checkpoints and weight conversion see the same tree."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  kernel_init: Callable = torch_default_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H', W', features] in dtype."""
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides),
                  tuple(self.padding))


def stacked_init(init: Callable, num: int) -> Callable:
  """An initialiser of a [num, *shape] variable holding `num` identical copies of init(key, shape)
  (what nn.vmap(..., split_rngs={'params': False}) creates for modality-specific modules)."""
  def f(key, shape, dtype=jnp.float32):
    if shape[0] != num:
      raise ValueError(f"stacked variable shape {shape} does not start with {num}")
    return jnp.broadcast_to(init(key, shape[1:], dtype), shape)
  return f


class StackedConv(Conv):
  """`num` bias-free convolutions stored as one kernel [num, kh, kw, Cin, Cout]; call with the index
  of the copy to apply. Each copy is a separate (ungrouped) convolution: a vmapped nn.Conv becomes a
  grouped convolution, whose backward pass XLA:CPU runs far slower."""
  num: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, index: int) -> jax.Array:
    """x: [B, H, W, Cin]; index: static int in [0, num). Returns [B, H', W', features]."""
    kernel = self.param("kernel", stacked_init(self.kernel_init, self.num),
                        (self.num, *self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    return conv2d(x.astype(self.dtype), kernel[index].astype(self.dtype), tuple(self.strides),
                  tuple(self.padding))


# --- normalisation -------------------------------------------------------------------------------------

def _weighted_sum(rows: jax.Array, per_row: jax.Array) -> jax.Array:
  """sum_i per_row[i] * rows[i] for rows [N, C], per_row [N]: a matrix-vector product, not a
  reduction. XLA:CPU rewrites a reduction over many elements into a reduce-window tree, which ran
  at about a third of the product's speed on the synthetic step's maps (BENCHMARKS.md, "Batch
  statistics"). HIGHEST keeps exact float32 sums where the default precision would round the
  operands (TPU)."""
  return jnp.matmul(per_row, rows, precision=jax.lax.Precision.HIGHEST)


def _rows(x: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [B, H, W, C] as float32 rows [B*H*W, C], and each row's sample weight [B*H*W]."""
  b, h, w, c = x.shape
  return (x.astype(jnp.float32).reshape(b * h * w, c),
          jnp.repeat(weights.astype(jnp.float32), h * w))


def _batch_norm_forward(x, weights, scale, bias, epsilon):
  chex.assert_rank(x, 4)
  chex.assert_shape([weights, scale, bias], [(x.shape[0],), (x.shape[-1],), (x.shape[-1],)])
  flat, per_row = _rows(x, weights)
  # An exact integer in float32 either way; summing the [B] weights, not the [B*H*W] rows.
  count = jnp.sum(weights.astype(jnp.float32)) * (x.shape[1] * x.shape[2])
  denom = jnp.maximum(count, 1.0)
  mean = _weighted_sum(flat, per_row) / denom
  var = _weighted_sum(jnp.square(flat - mean), per_row) / denom
  inv = jax.lax.rsqrt(var + epsilon)
  y = (flat - mean) * (inv * scale) + bias
  return (y.reshape(x.shape), mean, var, count), (x, weights, denom, mean, inv, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_train(x: jax.Array, weights: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm of x [B, H, W, C] with statistics over the samples weighted by
  `weights` [B] (0 or 1); every sample is normalised with them. scale, bias: float32 [C].

  Returns float32 (y [B, H, W, C], mean [C], biased variance [C], positions counted []); with no
  sample counted, mean 0 and variance 0. The backward pass is written out (BatchNorm's gradient
  with the weights in the statistics' terms) so that its sums are matrix-vector products too.
  The weights get no gradient.
  """
  return _batch_norm_forward(x, weights, scale, bias, epsilon)[0]


def _batch_norm_backward(epsilon, residuals, cotangents):
  del epsilon
  x, weights, denom, mean, inv, scale = residuals
  g_y, g_mean, g_var, _ = cotangents
  flat, per_row = _rows(x, weights)
  g_y = g_y.reshape(flat.shape).astype(jnp.float32)
  centred = flat - mean
  ones = jnp.ones(per_row.shape, jnp.float32)
  g_bias = _weighted_sum(g_y, ones)
  g_scale = _weighted_sum(g_y * centred, ones) * inv
  # The statistics' total cotangents (their own, plus what y passes back through them), spread
  # over the counted rows.
  g_mean_total = g_mean - inv * scale * g_bias
  g_var_total = g_var - 0.5 * inv * inv * scale * g_scale
  g_x = g_y * (inv * scale) + per_row[:, None] * ((g_mean_total + 2.0 * g_var_total * centred)
                                                  / denom)
  return (g_x.reshape(x.shape).astype(x.dtype), jnp.zeros_like(weights), g_scale, g_bias)


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class MaskedBatchNorm(nn.Module):
  """BatchNorm over NHWC whose training statistics use only the samples where `mask` is true.

  Every BatchNorm of the ResNet tower. The modality-specific stems pass a mask: each stem
  normalises with the statistics of its own modality (as separate visible / infrared modules do in
  PyTorch VI-ReID code), although the stems run on the whole batch. Without a mask it is
  flax.linen.BatchNorm's training function (two-pass variance) with the sums of both passes as
  matrix-vector products (`batch_norm_train`): 3-4x faster forward + backward on XLA:CPU. A batch
  with no sample of the modality leaves the running statistics unchanged and normalises with mean
  0 / variance 0 (finite, and discarded by the caller), so gradients stay NaN-free. Variables are
  named like flax.linen.BatchNorm's (params scale/bias, batch_stats mean/var); momentum 0.9 and
  epsilon 1e-5 are torch's BatchNorm2d defaults (torch momentum 0.1). The variance is the biased
  one, as in flax.linen.BatchNorm.

  With `num` set, every variable holds `num` independent copies stacked on a leading axis ([num, C],
  initialised identically) and each call names the copy it uses and updates (`index`).
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones
  num: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               index: int | None = None) -> jax.Array:
    """x: [B, H, W, C]; mask: [B] bool or None (all samples); index: static int in [0, num), given
    exactly when num is set. Returns [B, H, W, C] in dtype."""
    if (self.num is None) != (index is None):
      raise ValueError(f"index ({index}) must be given exactly when num ({self.num}) is set")
    c = x.shape[-1]
    if self.num is None:
      shape, wrap, pick = (c,), (lambda f: f), (lambda a: a)
    else:
      shape, wrap, pick = (self.num, c), (lambda f: stacked_init(f, self.num)), (lambda a: a[index])
    scale = pick(self.param("scale", wrap(self.scale_init), shape, self.param_dtype))
    bias = pick(self.param("bias", wrap(nn.initializers.zeros), shape, self.param_dtype))
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
    if self.use_running_average:
      mean, var = pick(ra_mean.value), pick(ra_var.value)
    else:
      w = (jnp.ones((x.shape[0],), jnp.float32) if mask is None
           else mask.astype(jnp.float32))
      y, mean, var, count = batch_norm_train(x, w, scale.astype(jnp.float32),
                                             bias.astype(jnp.float32), self.epsilon)
      if not self.is_initializing():
        present = count > 0
        m = self.momentum

        def update(old, new):
          new = jnp.where(present, m * pick(old) + (1 - m) * new, pick(old))
          return new if self.num is None else jnp.asarray(old).at[index].set(new)

        ra_mean.value = update(ra_mean.value, mean)
        ra_var.value = update(ra_var.value, var)
      return y.astype(self.dtype)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - mean) * mul + bias.astype(jnp.float32)
    return y.astype(self.dtype)


# --- transformer ---------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (CLIP's nn.MultiheadAttention)."""
  width: int
  heads: int
  causal: bool = False
  qkv_std: float | None = None
  out_std: float | None = None
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, width] -> [B, T, width]."""
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
    head_dim = self.width // self.heads

    def dense(name, std):
      init = nn.initializers.normal(std) if std else torch_default_init
      return nn.Dense(self.width, kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=name)

    b, t, _ = x.shape
    q = dense("q_proj", self.qkv_std)(x).reshape(b, t, self.heads, head_dim)
    k = dense("k_proj", self.qkv_std)(x).reshape(b, t, self.heads, head_dim)
    v = dense("v_proj", self.qkv_std)(x).reshape(b, t, self.heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                       implementation=self.attention_impl)
    return dense("out_proj", self.out_std)(out.reshape(b, t, self.width))


class ResidualAttentionBlock(nn.Module):
  """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (c_fc, act, c_proj)."""
  width: int
  heads: int
  mlp_dim: int
  causal: bool = False
  act: str = "quick_gelu"
  ln_epsilon: float = 1e-5
  init_layers: int = 1  # Depth used by CLIP's initialisation scales.
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, width] -> [B, T, width]."""
    attn_std = self.width ** -0.5
    proj_std = attn_std * (2 * self.init_layers) ** -0.5
    fc_std = (2 * self.width) ** -0.5
    ln = functools.partial(nn.LayerNorm, epsilon=self.ln_epsilon, dtype=self.dtype,
                           param_dtype=self.param_dtype)
    h = ln(name="ln_1")(x)
    x = x + SelfAttention(self.width, self.heads, causal=self.causal, qkv_std=attn_std,
                          out_std=proj_std, attention_impl=self.attention_impl, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="attn")(h)
    h = ln(name="ln_2")(x)
    h = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.normal(fc_std), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="c_fc")(h)
    h = activation(self.act)(h)
    h = nn.Dense(self.width, kernel_init=nn.initializers.normal(proj_std), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="c_proj")(h)
    return x + h


class Transformer(nn.Module):
  """A stack of `layers` ResidualAttentionBlocks named resblocks_0 .. resblocks_{layers-1}."""
  width: int
  layers: int
  heads: int
  mlp_dim: int
  causal: bool = False
  act: str = "quick_gelu"
  ln_epsilon: float = 1e-5
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, T, width] -> [B, T, width]."""
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.width, self.heads, self.mlp_dim, causal=self.causal,
                                 act=self.act, ln_epsilon=self.ln_epsilon, init_layers=self.layers,
                                 attention_impl=self.attention_impl, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"resblocks_{i}")(x)
    return x


def select_modality(stacked: jax.Array, modality: jax.Array | None) -> jax.Array:
  """stacked: [M, B, ...] outputs of M modality-specific modules on the whole batch; modality: [B]
  int32 in [0, M) (None allowed when M == 1). Returns [B, ...], row b taken from stacked[modality[b]].
  Out-of-range modality values are clamped by the gather (they cannot raise inside jit)."""
  m, b = stacked.shape[:2]
  if modality is None:
    if m != 1:
      raise ValueError(f"modality is required when the tower has {m} modality-specific stems")
    return stacked[0]
  modality = jnp.asarray(modality, jnp.int32)
  if modality.shape != (b,):
    raise ValueError(f"modality must have shape ({b},), got {modality.shape}")
  if m == 1:
    return stacked[0]
  # A chain of selects (clamped like a gather would be): its gradient is a select too, where the
  # gather's is a scatter-add.
  modality = jnp.clip(modality, 0, m - 1).reshape((b,) + (1,) * (stacked.ndim - 2))
  out = stacked[0]
  for i in range(1, m):
    out = jnp.where(modality == i, stacked[i], out)
  return out


def modality_masks(modality: jax.Array | None, num_modalities: int, batch: int) -> jax.Array:
  """[M, B] bool, mask[m, b] = (modality[b] == m); all true when modality is None (M must be 1)."""
  if modality is None:
    if num_modalities != 1:
      raise ValueError(f"modality is required when the tower has {num_modalities} stems")
    return jnp.ones((1, batch), bool)
  modality = jnp.asarray(modality, jnp.int32)
  return modality[None, :] == jnp.arange(num_modalities, dtype=jnp.int32)[:, None]
