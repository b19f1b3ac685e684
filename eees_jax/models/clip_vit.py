"""CLIP's VisionTransformer image tower (ViT-B/16 family) with modality-specific patch embeddings.

Same computation as OpenAI's clip/model.py VisionTransformer: patch embedding conv (no bias), class
token, positional embedding, ln_pre, pre-norm transformer (quick-GELU), ln_post on the class token,
projection. Additions:
- num_modalities patch embeddings (stacked [M, p, p, 3, width], initialised identically); every
  sample uses its modality's one. All run on the whole batch and the result is gathered per sample
  (a patch embedding is ~1% of ViT-B/16's FLOPs).
- patch_stride < patch_size gives overlapping patches (TransReID); the token grid for an H x W input
  is ((H - p) // s + 1, (W - p) // s + 1).
- The positional embedding is stored at CLIP's grid (14 x 14 + 1 for ViT-B/16 at 224) and resized at
  call time to the token grid (torch-compatible bicubic or bilinear); an unchanged grid uses it as is.

Variables (names mirror clip/model.py):
  params/patch_embed/kernel [M, p, p, 3, width]; params/class_embedding [width];
  params/positional_embedding [pos_grid**2 + 1, width]; params/ln_pre, params/ln_post {scale, bias};
  params/transformer/resblocks_{i}/{ln_1, attn/{q,k,v,out}_proj, ln_2, c_fc, c_proj};
  params/proj [width, output_dim].
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eees_jax.models import layers as L

Dtype = Any


class VisionTransformer(nn.Module):
  """CLIP ViT; defaults are ViT-B/16's. mlp_dim None means 4 * width."""
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  output_dim: int = 512
  pos_grid: int = 14
  patch_stride: int | None = None
  num_modalities: int = 2
  mlp_dim: int | None = None
  act: str = "quick_gelu"
  ln_epsilon: float = 1e-5
  interpolation: str = "bicubic"
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, modality: jax.Array | None = None,
               train: bool = False) -> dict[str, jax.Array]:
    """x: [B, H, W, 3] float, already normalised; modality: [B] int32 in [0, num_modalities)
    (None allowed when num_modalities == 1); train is accepted for a uniform tower interface (the
    ViT has no dropout or batch statistics).

    Returns {'cls': [B, width] class token after ln_post, 'pooled': [B, output_dim] = cls @ proj}.
    """
    del train
    stride = self.patch_stride or self.patch_size
    if not 0 < stride <= self.patch_size:
      raise ValueError(f"patch_stride must be in [1, patch_size={self.patch_size}], got {stride}")
    x = jnp.asarray(x, self.dtype)
    scale = self.width ** -0.5
    embed = nn.vmap(nn.Conv, variable_axes={"params": 0}, split_rngs={"params": False},
                    in_axes=None, out_axes=0, axis_size=self.num_modalities)
    stacked = embed(self.width, (self.patch_size, self.patch_size), strides=(stride, stride),
                    padding="VALID", use_bias=False, kernel_init=L.torch_default_init,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed")(x)
    x = L.select_modality(stacked, modality)  # [B, gh, gw, width]
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, self.width)

    cls = self.param("class_embedding", nn.initializers.normal(scale), (self.width,),
                     self.param_dtype)
    pos = self.param("positional_embedding", nn.initializers.normal(scale),
                     (self.pos_grid ** 2 + 1, self.width), self.param_dtype)
    pos = L.resize_token_pos_embed(pos, (gh, gw), self.pos_grid, self.interpolation)
    cls_tok = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls_tok, x], axis=1) + pos.astype(self.dtype)
    x = nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="ln_pre")(x)
    x = L.Transformer(self.width, self.layers, self.heads, self.mlp_dim or 4 * self.width,
                      causal=False, act=self.act, ln_epsilon=self.ln_epsilon,
                      attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="transformer")(x)
    cls_out = nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="ln_post")(x[:, 0])
    proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim),
                      self.param_dtype)
    pooled = jnp.dot(cls_out, proj.astype(self.dtype))
    return {"cls": cls_out, "pooled": pooled}
