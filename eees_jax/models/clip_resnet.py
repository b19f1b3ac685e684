"""CLIP's ModifiedResNet image tower (RN50 family) with modality-specific stems.

Same computation as OpenAI's clip/model.py ModifiedResNet: a 3-conv stem (BN + ReLU each) and a
2x2 average pool; bottleneck blocks whose stride is an average pool after the 3x3 conv (and before
the 1x1 downsample conv: anti-aliased strided convolutions); attention pooling with a learned
positional embedding, whose query is the mean token.

Additions for visible-infrared re-identification:
- num_modalities copies of the stem (conv1..bn3 + avgpool), stacked on a leading axis of every stem
  variable ([M, ...]) and initialised identically; layer1..layer4 and attnpool are shared. Each
  sample goes through the stem of its modality. By default every stem runs on the whole batch and
  the output is selected per sample (shapes stay static; in training each stem's BatchNorm uses
  only its own modality's samples). The stem is ~4% of RN50's forward FLOPs but, at 4x the
  resolution of layer1 with few channels, ~10-20% of a CPU train step, so a caller whose batch is
  sorted by modality with static counts passes modality_counts and each stem runs on its own
  samples only (same results).
- last_stride: stride of layer4 (1 gives an 18x9 map for a 288x144 input).
- The attention pool's positional embedding is stored at CLIP's grid (7x7 + 1 for 224 input) and
  resized at call time to the feature grid (torch-compatible bicubic or bilinear); unchanged grids
  use it as is.
- The attention pool computes only the mean token's query (CLIP discards the other outputs), and
  folds the key and value projections into the query and the attention-weighted token mean
  (the same products, reassociated), so keys and values of the hw+1 tokens are never formed:
  2 x (hw+1) x C^2 multiply-adds per image become ~2 x C^2 (2.7 of RN50's 16 forward GFLOP at
  288x144 with last stride 1).
- 1x1 convolutions run as matmuls over channels (layers.Conv / conv2d), which XLA:CPU executes
  3-4x faster than its 1x1 convolution path, forward and backward; variables are unchanged.
- remat: stages ('stem', 'layer1'..'layer4') whose activations are recomputed in the backward pass
  instead of kept from the forward (jax.checkpoint on the stem and on each bottleneck block of a
  named layer: only block inputs are kept). Less memory for more compute; the same function.

Variables (names mirror clip/model.py; eees_jax/weights/openai.py converts OpenAI / open_clip state
dicts):
  params/stem/{conv1,conv2,conv3}/kernel [M,3,3,in,out]; params/stem/{bn1,bn2,bn3}/{scale,bias} [M,C]
  params/layer{1..4}_{i}/{conv1,conv2,conv3,downsample_conv}/kernel,
      {bn1,bn2,bn3,downsample_bn}/{scale,bias}
  params/attnpool/positional_embedding [pos_grid**2 + 1, 32*width],
      {q_proj,k_proj,v_proj,c_proj}/{kernel,bias}
  batch_stats mirrors every BatchNorm with mean/var (stem ones stacked [M, C]).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eees_jax.models import layers as L

Dtype = Any
EXPANSION = 4
REMAT_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _avg_pool(x: jax.Array, s: int) -> jax.Array:
  """torch nn.AvgPool2d(s): kernel s, stride s, no padding, floor."""
  return nn.avg_pool(x, (s, s), strides=(s, s), padding="VALID") if s > 1 else x


class ResNetStem(nn.Module):
  """num_modalities stems, each conv1 (3x3 s2) -> bn1 -> relu -> conv2 -> bn2 -> relu -> conv3 ->
  bn3 -> relu -> avgpool 2, with variables stacked on a leading [M] axis.

  Each stem is its own (ungrouped) convolution chain: nn.vmap over the stems would turn conv2 and
  conv3 into grouped convolutions, whose backward pass XLA:CPU runs ~10x slower than ungrouped.
  """
  width: int
  num_modalities: int
  train: bool
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, modality: jax.Array | None,
               modality_counts: Sequence[int] | None = None) -> jax.Array:
    """x: [B, H, W, 3]; modality: [B] int32 (None allowed with one stem). Returns
    [B, H/4, W/4, width], each sample through the stem of its modality.

    Without modality_counts every stem runs on the whole batch (BN statistics over its own
    modality's samples) and the output is selected per sample. With modality_counts (static ints,
    the batch holds counts[0] samples of modality 0, then counts[1] of modality 1, ...) each stem
    runs on its own slice only: the same result for half the stem work.
    """
    conv = functools.partial(L.StackedConv, num=self.num_modalities, kernel_size=(3, 3),
                             padding=((1, 1), (1, 1)), dtype=self.dtype,
                             param_dtype=self.param_dtype)
    bn = functools.partial(L.MaskedBatchNorm, use_running_average=not self.train,
                           momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
                           param_dtype=self.param_dtype, num=self.num_modalities)
    layers = [(conv(self.width // 2, strides=(2, 2), name="conv1"), bn(name="bn1")),
              (conv(self.width // 2, name="conv2"), bn(name="bn2")),
              (conv(self.width, name="conv3"), bn(name="bn3"))]

    def stem(h, m, mask):
      for conv_m, bn_m in layers:
        h = nn.relu(bn_m(conv_m(h, m), mask, m))
      return _avg_pool(h, 2)

    if modality_counts is None:
      masks = L.modality_masks(modality, self.num_modalities, x.shape[0])
      outs = [stem(x, m, masks[m]) for m in range(self.num_modalities)]
      return L.select_modality(jnp.stack(outs), modality)
    counts = tuple(int(c) for c in modality_counts)
    if len(counts) != self.num_modalities or sum(counts) != x.shape[0] or min(counts) < 0:
      raise ValueError(f"modality_counts {counts} must give {self.num_modalities} non-negative "
                       f"counts summing to the batch size {x.shape[0]}")
    starts = np.cumsum((0,) + counts)
    return jnp.concatenate([stem(x[starts[m]:starts[m + 1]], m, None)
                            for m in range(self.num_modalities) if counts[m]])


class Bottleneck(nn.Module):
  """CLIP's bottleneck: 1x1, 3x3, avgpool(stride), 1x1 (x4); avgpool + 1x1 conv + BN shortcut."""
  planes: int
  stride: int
  train: bool
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H/stride, W/stride, 4*planes]."""
    conv = functools.partial(L.Conv, dtype=self.dtype, param_dtype=self.param_dtype)
    bn = functools.partial(L.MaskedBatchNorm, use_running_average=not self.train,
                           momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
                           param_dtype=self.param_dtype)
    out = nn.relu(bn(name="bn1")(conv(self.planes, (1, 1), name="conv1")(x)))
    out = conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(out)
    out = nn.relu(bn(name="bn2")(out))
    out = _avg_pool(out, self.stride)
    out = conv(self.planes * EXPANSION, (1, 1), name="conv3")(out)
    # CLIP zero-initialises the last BN scale of every block (identity residual at init).
    out = bn(scale_init=nn.initializers.zeros, name="bn3")(out)
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
      identity = _avg_pool(x, self.stride)
      identity = conv(self.planes * EXPANSION, (1, 1), name="downsample_conv")(identity)
      identity = bn(name="downsample_bn")(identity)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """CLIP's QKV attention pooling, computing only the output of the mean (first) token.

  pos_grid is the side of the grid the positional embedding is stored at (input_resolution // 32).
  """
  pos_grid: int
  heads: int
  output_dim: int
  interpolation: str = "bicubic"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, h, w, C] -> [B, output_dim]."""
    b, h, w, c = x.shape
    if c % self.heads:
      raise ValueError(f"attention pool width {c} is not divisible by heads {self.heads}")
    head_dim = c // self.heads
    pos = self.param("positional_embedding",
                     nn.initializers.normal(c ** -0.5), (self.pos_grid ** 2 + 1, c),
                     self.param_dtype)
    pos = L.resize_token_pos_embed(pos, (h, w), self.pos_grid, self.interpolation)
    tokens = x.reshape(b, h * w, c)
    mean = jnp.mean(tokens.astype(jnp.float32), axis=1, keepdims=True).astype(tokens.dtype)
    seq = jnp.concatenate([mean, tokens], axis=1) + pos.astype(self.dtype)  # [B, hw+1, C]
    dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(c ** -0.5),
                              dtype=self.dtype, param_dtype=self.param_dtype)
    proj = functools.partial(DenseParams, c, kernel_init=nn.initializers.normal(c ** -0.5),
                             dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(c, name="q_proj")(seq[:, 0]).reshape(b, self.heads, head_dim)
    wk, bk = proj(name="k_proj")()
    wv, bv = proj(name="v_proj")()
    wk = wk.reshape(c, self.heads, head_dim)
    wv = wv.reshape(c, self.heads, head_dim)
    # logits[b,n,t] = q[b,n] . (seq[b,t] @ Wk_n + bk_n) = seq[b,t] . (Wk_n q[b,n]) + bk_n . q[b,n]:
    # the keys are never formed (hw+1 tokens x C x C multiply-adds become C x C per image).
    qk = jnp.einsum("bnd,cnd->bnc", q, wk)
    q_bias = jnp.einsum("bnd,nd->bn", q, bk.reshape(self.heads, head_dim),
                        preferred_element_type=jnp.float32)
    logits = (jnp.einsum("btc,bnc->bnt", seq, qk, preferred_element_type=jnp.float32)
              + q_bias[:, :, None])
    probs = jax.nn.softmax(logits * head_dim ** -0.5, axis=-1).astype(self.dtype)
    # sum_t p[b,n,t] (seq[b,t] @ Wv_n + bv_n) = (sum_t p[b,n,t] seq[b,t]) @ Wv_n + bv_n, as the
    # probabilities sum to 1: the values are never formed either.
    ctx = jnp.einsum("bnt,btc->bnc", probs, seq)
    out = (jnp.einsum("bnc,cnd->bnd", ctx, wv) + bv.reshape(self.heads, head_dim)).reshape(b, c)
    return dense(self.output_dim, name="c_proj")(out)


class DenseParams(nn.Module):
  """The variables of nn.Dense(features) (params kernel [in, features], bias [features]) with
  nn.Dense's initialisation, returned in dtype for a caller that applies them in another order."""
  features: int
  in_features: int | None = None
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    """Returns kernel [in_features, features] and bias [features] (in_features defaults to
    features)."""
    fan_in = self.features if self.in_features is None else self.in_features
    kernel = self.param("kernel", self.kernel_init, (fan_in, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return kernel.astype(self.dtype), bias.astype(self.dtype)


class ModifiedResNet(nn.Module):
  """CLIP ModifiedResNet with `num_modalities` stems; defaults are CLIP RN50's.

  layers: blocks per stage; width: stem width (stage widths are 1, 2, 4, 8 x width, times 4 out);
  output_dim / heads: attention pool; pos_grid: stored positional-embedding grid (CLIP:
  input_resolution // 32); last_stride: layer4 stride; interpolation: 'bicubic' | 'bilinear';
  remat: stages recomputed in the backward pass (module doc), any of REMAT_STAGES.
  """
  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  output_dim: int = 1024
  heads: int = 32
  pos_grid: int = 7
  num_modalities: int = 2
  last_stride: int = 2
  interpolation: str = "bicubic"
  remat: Sequence[str] = ()
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, modality: jax.Array | None = None, train: bool = False,
               modality_counts: Sequence[int] | None = None) -> dict[str, jax.Array]:
    """x: [B, H, W, 3] float, already normalised; modality: [B] int32 in [0, num_modalities)
    (0 visible, 1 infrared; may be None when num_modalities == 1). modality_counts: optional
    static layout promise (the batch is sorted by modality, counts[m] samples of modality m, as the
    trainer's V, Vc, R batches are): each stem then runs on its own samples only (see ResNetStem);
    results are the same as without it for a batch that keeps the promise.

    Returns {'map': [B, h, w, 32*width] layer4 output, 'pooled': [B, output_dim]}, in dtype.
    """
    if len(self.layers) != 4:
      raise ValueError(f"layers must have 4 entries, got {self.layers}")
    if self.last_stride not in (1, 2):
      raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
    unknown = sorted(set(self.remat) - set(REMAT_STAGES))
    if unknown:
      raise ValueError(f"remat: unknown stage(s) {unknown}; choose from {', '.join(REMAT_STAGES)}")
    # static_argnums counts self: (x, modality, modality_counts) are 1, 2, 3.
    stem_cls = nn.remat(ResNetStem, static_argnums=(3,)) if "stem" in self.remat else ResNetStem
    x = jnp.asarray(x, self.dtype)
    x = stem_cls(self.width, self.num_modalities, train=train, bn_momentum=self.bn_momentum,
                   bn_epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="stem")(x, modality, modality_counts)

    strides = (1, 2, 2, self.last_stride)
    for stage, (blocks, stride) in enumerate(zip(self.layers, strides)):
      planes = self.width * 2 ** stage
      block_cls = nn.remat(Bottleneck) if f"layer{stage + 1}" in self.remat else Bottleneck
      block = functools.partial(block_cls, train=train, bn_momentum=self.bn_momentum,
                                bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                                param_dtype=self.param_dtype)
      for i in range(blocks):
        x = block(planes, stride if i == 0 else 1, name=f"layer{stage + 1}_{i}")(x)
    pooled = AttentionPool2d(self.pos_grid, self.heads, self.output_dim,
                             interpolation=self.interpolation, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="attnpool")(x)
    return {"map": x, "pooled": pooled}
