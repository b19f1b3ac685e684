"""eees_jax.xla_cpu: the CPU compile options reach the compiled program, change no result beyond
float rounding, and stay off where they were not measured."""
import re

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from eees_jax import xla_cpu


def _conv_grad(x, k):
  def f(x, k):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y) @ k[0, 0])
  return jax.grad(f, argnums=(0, 1))(x, k)


def test_options_reach_the_program():
  if jaxlib.__version__ != xla_cpu.MEASURED_JAXLIB:
    pytest.skip("the options are only applied with the jaxlib they were measured on")
  opts = xla_cpu.compiler_options("cpu")
  assert opts == xla_cpu.DEFAULTS
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 6, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
  plain = jax.jit(_conv_grad).lower(x, k).compile()
  tuned = jax.jit(_conv_grad, compiler_options=opts).lower(x, k).compile()
  # jaxlib sends the convolutions to YNNPACK; the project's options keep them on XLA's own path.
  assert re.search(r'"kind":"__ynn_fusion"', plain.as_text())
  assert not re.search(r'"kind":"__ynn_fusion"', tuned.as_text())
  for a, b in zip(plain(x, k), tuned(x, k)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_off_elsewhere(monkeypatch):
  assert xla_cpu.compiler_options("gpu") is None
  monkeypatch.setenv(xla_cpu.ENV_SWITCH, "0")
  assert xla_cpu.compiler_options("cpu") is None
  monkeypatch.delenv(xla_cpu.ENV_SWITCH)
  monkeypatch.setattr(jaxlib, "__version__", "0.0.1")
  assert xla_cpu.compiler_options("cpu") is None
