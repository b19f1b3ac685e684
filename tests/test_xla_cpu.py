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


def _fusions(compiled) -> int:
  return len(re.findall(r'"kind":"__ynn_fusion"', compiled.as_text()))


def test_options_reach_the_program(monkeypatch):
  if jaxlib.__version__ != xla_cpu.MEASURED_JAXLIB:
    pytest.skip("the options are only applied with the jaxlib they were measured on")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 8, 32)), jnp.float32)
  k = jnp.asarray(0.1 * rng.standard_normal((3, 3, 32, 32)), jnp.float32)
  plain = jax.jit(_conv_grad).lower(x, k).compile()
  monkeypatch.delenv(xla_cpu.ENV_CONVOLUTIONS, raising=False)
  eigen = xla_cpu.compiler_options("cpu")
  assert eigen == {**xla_cpu.SCHEDULE, **xla_cpu.EIGEN_CONVOLUTIONS}
  monkeypatch.setenv(xla_cpu.ENV_CONVOLUTIONS, "ynnpack")
  ynnpack = xla_cpu.compiler_options("cpu")
  assert ynnpack == xla_cpu.SCHEDULE
  with_ynnpack = jax.jit(_conv_grad, compiler_options=ynnpack).lower(x, k).compile()
  with_eigen = jax.jit(_conv_grad, compiler_options=eigen).lower(x, k).compile()
  # jaxlib sends the three convolutions (forward, input and kernel gradients) and the matmul to
  # YNNPACK; the opt-out keeps that, the default takes the convolutions back to XLA's own path.
  assert _fusions(plain) == _fusions(with_ynnpack) > _fusions(with_eigen) >= 1
  for compiled in (with_ynnpack, with_eigen):
    for a, b in zip(plain(x, k), compiled(x, k)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_convolution_choice(monkeypatch):
  if jaxlib.__version__ != xla_cpu.MEASURED_JAXLIB:
    pytest.skip("the options are only applied with the jaxlib they were measured on")
  monkeypatch.setenv(xla_cpu.ENV_CONVOLUTIONS, "onednn")
  with pytest.raises(ValueError, match="ynnpack"):
    xla_cpu.compiler_options("cpu")


def test_off_elsewhere(monkeypatch):
  assert xla_cpu.compiler_options("gpu") is None
  monkeypatch.setenv(xla_cpu.ENV_SWITCH, "0")
  assert xla_cpu.compiler_options("cpu") is None
  monkeypatch.delenv(xla_cpu.ENV_SWITCH)
  monkeypatch.setattr(jaxlib, "__version__", "0.0.1")
  assert xla_cpu.compiler_options("cpu") is None
