"""Parameter groups, freezing and the learning-rate schedule of eees_jax.optim."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eees_jax import optim


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      lr=0.1, weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=0.0,
      groups=((r"^model/bnneck_f/bias$", 0.0), (r"^model/classifier_f/", 2.0), (r".*", 1.0)),
      warmup_epochs=2, warmup_from=0.01, milestones=(4, 6), gamma=0.1))
  c.update(kw)
  return c


def _params():
  return {"model": {"bnneck_f": {"bias": jnp.zeros(3), "scale": jnp.ones(3)},
                    "classifier_f": {"kernel": jnp.ones((3, 2))},
                    "encoder": {"w": jnp.ones(4)}}}


def test_groups_first_match_wins_and_unmatched_is_an_error():
  labels, mults = optim.group_labels(_params(), _cfg().groups)
  assert mults[labels["model"]["bnneck_f"]["bias"]] == 0.0
  assert mults[labels["model"]["bnneck_f"]["scale"]] == 1.0
  assert mults[labels["model"]["classifier_f"]["kernel"]] == 2.0
  with pytest.raises(ValueError, match="model/encoder/w"):
    optim.group_labels(_params(), ((r"^model/(bnneck|classifier)", 1.0),))


def test_frozen_parameter_does_not_move_and_multiplier_scales_the_update():
  params = _params()
  tx, _ = optim.make_optimizer(params, _cfg(warmup_epochs=0), steps_per_epoch=1)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["model"]["bnneck_f"]["bias"], 0.0)
  # Adam's first step moves every parameter by lr (times the group multiplier), whatever the grad.
  np.testing.assert_allclose(updates["model"]["encoder"]["w"], -0.1, rtol=1e-5)
  np.testing.assert_allclose(updates["model"]["classifier_f"]["kernel"], -0.2, rtol=1e-5)


def test_weight_decay_is_l2_added_to_the_gradient_like_torch_adam():
  params = {"w": jnp.array([2.0])}
  cfg = _cfg(weight_decay=0.5, warmup_epochs=0, groups=((".*", 1.0),))
  tx, _ = optim.make_optimizer(params, cfg, steps_per_epoch=1)
  # Gradient zero: the decayed-weight term 0.5 * 2 = 1 alone drives Adam; first step = -lr * sign.
  updates, _ = tx.update({"w": jnp.array([0.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], [-0.1], rtol=1e-5)


def test_schedule_warmup_then_steps():
  s = optim.lr_schedule(1.0, steps_per_epoch=10, warmup_epochs=2, warmup_from=0.01,
                        milestones=(4, 6), gamma=0.1)
  np.testing.assert_allclose(float(s(0)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 0.01 + 0.99 * 0.5, rtol=1e-6)
  assert float(s(20)) == pytest.approx(1.0)
  assert float(s(39)) == pytest.approx(1.0)
  assert float(s(40)) == pytest.approx(0.1)
  assert float(s(60)) == pytest.approx(0.01)
