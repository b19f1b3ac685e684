"""The error type of description generation."""


class DescribeError(ValueError):
  """Bad input to `eees_jax.describe`; the message names the file, folder or flag and what to do."""
