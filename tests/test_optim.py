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


def _grad(w):
  """Gradient of an anisotropic quadratic, so every step sees a different, non-zero gradient."""
  return np.array([3.0, -0.5, 0.2]) * (w - np.array([1.0, -2.0, 0.5])) + np.array([0.1, 0.0, -0.3])


def test_weight_decay_is_l2_added_to_the_gradient_like_torch_adam():
  """Five steps against torch.optim.Adam(weight_decay=...), which adds wd * w to the gradient.

  Decoupled AdamW (torch.optim.AdamW, optax.adamw) takes other steps here: checked below, so
  this comparison tells the two apart.
  """
  torch = pytest.importorskip("torch")
  w0 = np.array([2.0, 0.5, -1.0])
  lr, wd = 0.1, 0.5
  cfg = _cfg(lr=lr, weight_decay=wd, warmup_epochs=0, milestones=(), groups=((".*", 1.0),))
  params = {"w": jnp.asarray(w0, jnp.float32)}
  tx, _ = optim.make_optimizer(params, cfg, steps_per_epoch=1)
  state = tx.init(params)
  ours = []
  for _ in range(5):
    updates, state = tx.update({"w": jnp.asarray(_grad(np.asarray(params["w"])), jnp.float32)},
                               state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    ours.append(np.asarray(params["w"]))

  def torch_run(make):
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    opt = make([w])
    out = []
    for _ in range(5):
      w.grad = torch.tensor(_grad(w.detach().numpy()), dtype=torch.float64)
      opt.step()
      out.append(w.detach().numpy().copy())
    return np.stack(out)

  adam_l2 = torch_run(lambda p: torch.optim.Adam(p, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                                 weight_decay=wd))
  adamw = torch_run(lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                                weight_decay=wd))
  np.testing.assert_allclose(np.stack(ours), adam_l2, rtol=1e-5, atol=1e-6)
  assert np.abs(adamw - adam_l2).max() > 1e-2  # the case tells L2-Adam from decoupled AdamW


def test_schedule_warmup_then_steps():
  s = optim.lr_schedule(1.0, steps_per_epoch=10, warmup_epochs=2, warmup_from=0.01,
                        milestones=(4, 6), gamma=0.1)
  np.testing.assert_allclose(float(s(0)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 0.01 + 0.99 * 0.5, rtol=1e-6)
  assert float(s(20)) == pytest.approx(1.0)
  assert float(s(39)) == pytest.approx(1.0)
  assert float(s(40)) == pytest.approx(0.1)
  assert float(s(60)) == pytest.approx(0.01)
