"""Device-side image normalisation and the CLIP pixel statistics.

The input pipeline ships uint8 images (a quarter of the bytes of float32 from host to device)
and the train / eval step normalises them on the accelerator with `normalize`. This module imports
only jax, so device code can use it without pulling in TensorFlow.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

# OpenAI CLIP's preprocessing statistics (RGB, on the [0, 1] scale).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images: jnp.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> jnp.ndarray:
  """uint8 [..., 3] RGB in 0..255 -> float32 [..., 3], (x / 255 - mean) / std per channel."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
