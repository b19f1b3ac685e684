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


def _numpy_adam(w0, grad_fn, lrs, gates, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
  """Plain-loop L2 Adam whose step t is scaled by lrs[t] * gates[t]; moments see every gradient."""
  w, m, v, out = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), []
  for t, (lr, gate) in enumerate(zip(lrs, gates), start=1):
    g = grad_fn(w) + wd * w
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - lr * gate * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    out.append(w.copy())
  return np.stack(out)


def test_probe_freezes_the_matching_parameters_for_its_epochs_only():
  """2 epochs of 2 steps frozen for model/encoder/, then Adam on; the heads train throughout."""
  w0 = np.array([2.0, 0.5, -1.0])
  cfg = _cfg(lr=0.1, weight_decay=0.01, warmup_epochs=1, warmup_from=0.5, milestones=(3,),
             gamma=0.1, groups=((".*", 1.0),), probe_epochs=2, probe_frozen=r"^model/encoder/")
  params = {"model": {"encoder": {"w": jnp.asarray(w0, jnp.float32)},
                      "classifier_f": {"w": jnp.asarray(w0, jnp.float32)}}}
  tx, schedule = optim.make_optimizer(params, cfg, steps_per_epoch=2)
  state = tx.init(params)
  enc, head = [], []
  for _ in range(8):
    grads = jax.tree.map(lambda p: jnp.asarray(_grad(np.asarray(p)), jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    enc.append(np.asarray(params["model"]["encoder"]["w"]))
    head.append(np.asarray(params["model"]["classifier_f"]["w"]))
  # The schedule by hand: warm-up 0.05 -> 0.1 over 2 steps, 0.1 until epoch 3, then 0.01.
  lrs = [0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01]
  np.testing.assert_allclose([float(schedule(t)) for t in range(8)], lrs, rtol=1e-6)
  np.testing.assert_allclose(
      np.stack(head), _numpy_adam(w0, _grad, lrs, [1] * 8, wd=0.01), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      np.stack(enc), _numpy_adam(w0, _grad, lrs, [0] * 4 + [1] * 4, wd=0.01), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(enc[3], w0)      # untouched for the 4 probe steps
  assert np.abs(enc[4] - w0).max() > 1e-2        # and moving from the fifth


def test_probe_regex_that_matches_nothing_is_an_error_and_zero_epochs_freeze_nothing():
  with pytest.raises(ValueError, match="probe_frozen 'tower/'"):
    optim.make_optimizer(_params(), _cfg(probe_epochs=1, probe_frozen="tower/"), steps_per_epoch=2)
  params = _params()
  tx, _ = optim.make_optimizer(params, _cfg(warmup_epochs=0, probe_epochs=0,
                                            probe_frozen="^model/encoder/"), steps_per_epoch=1)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["model"]["encoder"]["w"], -0.1, rtol=1e-5)
