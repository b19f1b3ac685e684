"""model.freeze_encoder_bn: the image tower's BatchNorm statistics stay the checkpoint's in training."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from eees_jax import experiment
from eees_jax.models import eees as eees_lib

VISION = dict(kind="resnet", layers=(1, 1, 1, 1), width=8, output_dim=16, heads=2, pos_grid=2,
              last_stride=1, interpolation="bilinear", num_modalities=2)


def _setup(freeze: bool):
  model = eees_lib.EEES(vision=VISION, num_classes=5, freeze_encoder_bn=freeze)
  modality = jnp.array([0, 0, 0, 1, 1, 1], jnp.int32)
  other = jax.random.normal(jax.random.PRNGKey(2), (6, 32, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), other, modality, train=False)
  # Running statistics of another batch (as a checkpoint's are of another data set): settle them
  # on `other` with AGW's rule, then train on a batch of a different scale and offset.
  unfrozen = eees_lib.EEES(vision=VISION, num_classes=5)
  step = jax.jit(lambda v: unfrozen.apply(v, other, modality, train=True,
                                          mutable=["batch_stats"])[1])
  for _ in range(60):
    variables = {"params": variables["params"], "batch_stats": step(variables)["batch_stats"]}
  images = jax.random.normal(jax.random.PRNGKey(1), (6, 32, 16, 3)) * 2.0 + 0.5
  return model, variables, images, modality


@pytest.mark.parametrize("freeze", [True, False])
def test_encoder_statistics_and_features(freeze):
  model, variables, images, modality = _setup(freeze)
  train_out, updated = model.apply(variables, images, modality, train=True, mutable=["batch_stats"])
  eval_out = model.apply(variables, images, modality, train=False)
  before = variables["batch_stats"]
  after = updated["batch_stats"]
  enc_same = jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: bool(np.array_equal(a, b)), before["encoder"], after["encoder"]))
  neck_same = bool(np.array_equal(before["bnneck_f"]["mean"], after["bnneck_f"]["mean"]))
  assert not neck_same                 # the BNNecks train either way
  if freeze:
    assert enc_same
    # The tower then computes in training what it computes at test time (no dropout here).
    np.testing.assert_allclose(train_out["f"], eval_out["f"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(train_out["v"], eval_out["v"], rtol=1e-5, atol=1e-6)
  else:
    assert not enc_same
    assert not np.allclose(train_out["f"], eval_out["f"], rtol=1e-3, atol=1e-4)


def test_gradients_still_reach_the_tower_when_frozen():
  model, variables, images, modality = _setup(True)

  def loss(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                         modality, train=True, mutable=["batch_stats"])
    return jnp.sum(out["v"] ** 2) + jnp.sum(out["f"] ** 2)

  grads = jax.grad(loss)(variables["params"])["encoder"]
  for name, sub in grads.items():   # every stage, and the stems' BatchNorm scales and biases
    leaves = jax.tree_util.tree_leaves(sub)
    assert all(np.all(np.isfinite(g)) for g in leaves), name
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0, name
  assert float(np.abs(grads["stem"]["bn1"]["scale"]).sum()) > 0


def test_option_reaches_the_model_and_the_checkpoint_record():
  config = synthetic.get_config()
  config.model.freeze_encoder_bn = True
  spec = experiment.model_spec(config, num_classes=7, pretrained=None)
  assert spec.freeze_encoder_bn
  assert experiment.build_model(spec).eees.freeze_encoder_bn
  record = spec.to_json()
  assert experiment.ModelSpec.from_json(record).freeze_encoder_bn
  # A checkpoint written before the option existed reads as the old behaviour.
  del record["freeze_encoder_bn"]
  assert not experiment.ModelSpec.from_json(record).freeze_encoder_bn
