"""The EEES network: a CLIP image tower with the two heads of SPEC section 1.

f: GeM pooling of the last feature map (ResNet) or the class token before projection (ViT), then a
BNNeck (BatchNorm, bias frozen by the optimiser config) and a bias-free identity classifier.
v: the tower's joint-space output (attention pool / projected class token), with its own BNNeck and
classifier. Text is not part of this module: descriptions are embedded by the text tower separately.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from eees_jax.models import towers

Array = jax.Array


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=axis, keepdims=True), eps))


def gem_pool(x: Array, p: Array | float, eps: float = 1e-6) -> Array:
  """Generalised mean over H and W: x [B, H, W, C] -> [B, C], (mean of max(x, eps)^p)^(1/p).

  Computed in float32: x^p overflows bfloat16 quickly.
  """
  x = jnp.maximum(x.astype(jnp.float32), eps)
  return jnp.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


class GeM(nn.Module):
  """Generalised-mean pooling with a learnable exponent p (Radenovic et al.): `gem_pool`."""
  p_init: float = 3.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.param("p", nn.initializers.constant(self.p_init), ())
    return gem_pool(x, p, self.eps)


class EEES(nn.Module):
  """Image tower + f and v heads. Inputs are normalised NHWC images and modality ids [B]."""
  vision: Mapping[str, Any]
  num_classes: int
  gem_p: float = 3.0
  dtype: Any = jnp.float32
  # True: the tower's BatchNorm layers normalise with their (pretrained) running statistics in
  # training too and never update them (frozen BN); the heads' BNNecks still train.
  freeze_encoder_bn: bool = False

  def setup(self):
    self.encoder = towers.build_vision_tower(dict(self.vision), dtype=self.dtype)
    if self.vision["kind"] == "resnet":
      self.gem = GeM(p_init=self.gem_p)
    # BNNeck: torch BatchNorm1d defaults (momentum 0.1, eps 1e-5); bias frozen via optim.groups.
    self.bnneck_f = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float32)
    self.bnneck_v = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float32)
    init = nn.initializers.normal(stddev=0.001)  # AGW's classifier initialisation
    self.classifier_f = nn.Dense(self.num_classes, use_bias=False, kernel_init=init, dtype=jnp.float32)
    self.classifier_v = nn.Dense(self.num_classes, use_bias=False, kernel_init=init, dtype=jnp.float32)

  def __call__(self, images: Array, modality: Array, train: bool = False) -> dict[str, Array]:
    """images [B, H, W, 3] normalised; modality [B] int32 (0 visible, 1 infrared).

    Returns f [B, Df], v [B, Dv] (float32, before BN), f_bn, v_bn, logits_f, logits_v [B, C].
    """
    out = self.encoder(images.astype(self.dtype), modality,
                       train=train and not self.freeze_encoder_bn)
    if "map" in out:
      f = self.gem(out["map"])
    else:
      f = out["cls"].astype(jnp.float32)
    v = out["pooled"].astype(jnp.float32)
    f_bn = self.bnneck_f(f, use_running_average=not train)
    v_bn = self.bnneck_v(v, use_running_average=not train)
    return dict(f=f, v=v, f_bn=f_bn, v_bn=v_bn,
                logits_f=self.classifier_f(f_bn), logits_v=self.classifier_v(v_bn))

  def embed(self, images: Array, modality: Array, flip: bool = True) -> Array:
    """Test-time feature [B, 2 * (Df + Dv)] (or half of it without flip), SPEC section 1.

    concat(l2(BN(f)), l2(v)) of the image and of its horizontal mirror.
    """
    def one(x):
      out = self(x, modality, train=False)
      return jnp.concatenate([l2_normalize(out["f_bn"]), l2_normalize(out["v"])], axis=-1)
    feats = one(images)
    if flip:
      feats = jnp.concatenate([feats, one(images[:, :, ::-1, :])], axis=-1)
    return feats

  def embed_joint(self, images: Array, modality: Array) -> Array:
    """l2(v) [B, Dv]: the image in CLIP's joint image-text space (text search, ESE's space)."""
    return l2_normalize(self(images, modality, train=False)["v"])
