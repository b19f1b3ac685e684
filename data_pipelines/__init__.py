"""Data sets, descriptions and the tf.data input pipeline of eees-jax."""
