"""CLIP's text transformer (encode_text of OpenAI's clip/model.py, and HF CLIPTextModel + projection).

Token + positional embedding, causal pre-norm transformer, ln_final, and the feature of the
end-of-text token projected into the joint image-text space. Which token is the end of text:
- eos_token_id None (OpenAI, and HF checkpoints whose config says eos_token_id 2): argmax of the
  token ids (the end-of-text token has the largest id of CLIP's vocabulary);
- eos_token_id an int (newer HF checkpoints): the first position holding that id.
Padding after the end-of-text token does not change the output (causal mask).

Variables: params/token_embedding/embedding [vocab, width]; params/positional_embedding
[context_length, width]; params/transformer/resblocks_{i}/...; params/ln_final {scale, bias};
params/text_projection [width, embed_dim].
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eees_jax.models import layers as L

Dtype = Any


class TextTransformer(nn.Module):
  """CLIP text tower; defaults are those of every OpenAI CLIP up to ViT-B (width 512, 8 heads)."""
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  embed_dim: int = 512
  mlp_dim: int | None = None
  act: str = "quick_gelu"
  ln_epsilon: float = 1e-5
  eos_token_id: int | None = None
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: [B, L] int32 with L <= context_length -> [B, embed_dim] text features."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, length = tokens.shape
    if length > self.context_length:
      raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 dtype=self.dtype, param_dtype=self.param_dtype, name="token_embedding")(tokens)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (self.context_length, self.width), self.param_dtype)
    x = x + pos[:length].astype(self.dtype)
    x = L.Transformer(self.width, self.layers, self.heads, self.mlp_dim or 4 * self.width,
                      causal=True, act=self.act, ln_epsilon=self.ln_epsilon,
                      attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="transformer")(x)
    x = nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="ln_final")(x)
    if self.eos_token_id is None:
      eot = jnp.argmax(tokens, axis=-1)
    else:
      eot = jnp.argmax(tokens == self.eos_token_id, axis=-1)
    x = x[jnp.arange(b), eot]  # [B, width]
    proj = self.param("text_projection", nn.initializers.normal(self.width ** -0.5),
                      (self.width, self.embed_dim), self.param_dtype)
    return jnp.dot(x, proj.astype(self.dtype))
