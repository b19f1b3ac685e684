"""Pieces of `python -m eees_jax.describe`: output log, quality flags, models (torch)."""
