"""Text transformer against OpenAI's clip/model.py encode_text (random weights)."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from eees_jax import weights as W
from eees_jax.models import towers
from _torch_refs import tiny_clip


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def tiny():
  """Text width 128 (2 heads), 2 layers, context 16, vocabulary 100 (end of text = 99)."""
  model = tiny_clip((1, 1, 1, 1), 8, 32, text_layers=2, seed=3)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, W.convert_openai_state_dict(sd, num_modalities=1)


def token_batch(length: int, eot_positions, seed: int = 0) -> np.ndarray:
  """Start token 98, random ids < 98, end of text 99 at the given positions, zeros after."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(1, 98, size=(len(eot_positions), length))
  tokens[:, 0] = 98
  for row, p in enumerate(eot_positions):
    tokens[row, p] = 99
    tokens[row, p + 1:] = 0
  return tokens


@pytest.mark.parametrize("length", [16, 10])
def test_parity_with_openai_encode_text(tiny, length):
  model, weights = tiny
  assert weights.text_config["heads"] == 2 and weights.text_config["eos_token_id"] is None
  tokens = token_batch(length, [1, 5, length - 1])
  with torch.no_grad():
    ref = model.encode_text(torch.from_numpy(tokens)).numpy()
  tower = towers.build_text_tower(weights.text_config)
  out = jax.jit(tower.apply)(weights.text_variables(), jnp.asarray(tokens, jnp.int32))
  assert out.shape == (3, 32)
  assert rel_err(out, ref) < 1e-4


def test_tokens_after_end_of_text_do_not_matter(tiny):
  _, weights = tiny
  tokens = token_batch(16, [4, 7])
  noisy = tokens.copy()
  noisy[0, 5:] = np.arange(11) + 10
  noisy[1, 8:] = 3
  apply = jax.jit(towers.build_text_tower(weights.text_config).apply)
  np.testing.assert_allclose(apply(weights.text_variables(), noisy),
                             apply(weights.text_variables(), tokens), rtol=1e-5, atol=1e-6)


def test_eos_token_id_mode_picks_first_occurrence(tiny):
  """HF mode: end of text is the first position holding eos_token_id (5 here, while larger ids,
  e.g. the start token 98, occur). Oracle: the argmax tower on the same sequence with id 99 at
  that position, 99 given the embedding of 5."""
  model, weights = tiny
  tokens = token_batch(16, [6, 9])
  argmax_tower = towers.build_text_tower(weights.text_config)
  eos_tower = towers.build_text_tower(weights.text_config, eos_token_id=5)
  t5 = tokens.copy()
  t5[t5 == 5] = 4
  t5[tokens == 99] = 5  # End of text is now id 5; larger ids remain elsewhere.
  t5[0, 10] = 5  # A later occurrence must not be picked.
  params = jax.tree.map(np.array, weights.text_variables())
  emb = params["params"]["token_embedding"]["embedding"]
  emb[5] = emb[99]  # Same embedding at the end-of-text position as the oracle's 99.
  ref = jax.jit(argmax_tower.apply)(weights.text_variables(), np.where(tokens == 5, 4, tokens))
  out = jax.jit(eos_tower.apply)(params, t5)
  assert rel_err(out, ref) < 1e-5


def test_too_many_tokens(tiny):
  _, weights = tiny
  with pytest.raises(ValueError, match="context length 16"):
    towers.build_text_tower(weights.text_config).apply(weights.text_variables(),
                                                   np.zeros((1, 17), np.int32))
