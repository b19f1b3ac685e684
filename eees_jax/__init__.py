"""eees-jax: EEES visible-infrared person re-identification in JAX/Flax."""
