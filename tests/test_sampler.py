"""AGW identity sampler: invariants checked by plain loops over the returned indices."""
import math

import numpy as np
import pytest

from data_pipelines import sampler
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord, TrainSet

# pid -> (#visible, #infrared); 7 has no infrared image and 8 no visible one: never drawn.
COUNTS = {0: (5, 3), 1: (1, 4), 2: (2, 1), 3: (6, 6), 4: (3, 2), 5: (4, 5), 6: (2, 2),
          7: (3, 0), 8: (0, 2)}


def make_train_set(counts=COUNTS, seed=0):
  records = []
  for pid, (n_vis, n_ir) in counts.items():
    records += [ImageRecord(f"cam1/{pid:04d}/{n:04d}.jpg", pid, 1, VISIBLE) for n in range(n_vis)]
    records += [ImageRecord(f"cam3/{pid:04d}/{n:04d}.jpg", pid, 3, INFRARED) for n in range(n_ir)]
  order = np.random.default_rng(seed).permutation(len(records))  # readers may interleave
  return TrainSet("root", tuple(records[i] for i in order), len(counts))


def test_steps_per_epoch_formula():
  ts = make_train_set()
  num_vis = sum(v for v, _ in COUNTS.values())  # 26
  num_ir = sum(i for _, i in COUNTS.values())   # 25
  assert sampler.steps_per_epoch(ts, 4, 2) == math.ceil(26 / 8) == 4
  assert sampler.steps_per_epoch(ts, 3, 3) == math.ceil(max(num_vis, num_ir) / 9) == 3
  assert sampler.steps_per_epoch(ts, 2, 1) == 13
  assert sampler.epoch_indices(ts, 4, 2, seed=0, epoch=0).shape == (4, 2, 8)


@pytest.mark.parametrize("P,K", [(4, 2), (7, 4), (3, 1)])
def test_epoch_invariants(P, K):
  ts = make_train_set()
  records = ts.records
  for epoch in range(3):
    indices = sampler.epoch_indices(ts, P, K, seed=5, epoch=epoch)
    assert indices.shape == (sampler.steps_per_epoch(ts, P, K), 2, P * K)
    for step in indices:
      visible, infrared = step
      assert all(records[i].modality == VISIBLE for i in visible)
      assert all(records[i].modality == INFRARED for i in infrared)
      for i in range(P * K):  # position i of both halves: the same identity
        assert records[visible[i]].pid == records[infrared[i]].pid
      identities = []
      for j in range(P):
        block_v = visible[j * K:(j + 1) * K]
        block_r = infrared[j * K:(j + 1) * K]
        pid = records[block_v[0]].pid
        assert {records[i].pid for i in block_v} == {pid} == {records[i].pid for i in block_r}
        identities.append(pid)
        for block, modality in ((block_v, 0), (block_r, 1)):
          available = COUNTS[pid][modality]
          if available >= K:  # without replacement
            assert len(set(block.tolist())) == K
          else:  # every draw is one of its few images
            assert len(set(block.tolist())) <= available
      assert len(set(identities)) == P
      assert not {7, 8} & set(identities)


def test_every_eligible_identity_and_image_is_drawn_eventually():
  ts = make_train_set()
  seen = set()
  for epoch in range(20):
    seen |= set(sampler.epoch_indices(ts, 4, 2, seed=1, epoch=epoch).ravel().tolist())
  drawable = {i for i, r in enumerate(ts.records) if r.pid not in (7, 8)}
  assert seen == drawable


def test_deterministic_per_seed_and_epoch():
  ts = make_train_set()
  a = sampler.epoch_indices(ts, 4, 2, seed=3, epoch=2)
  np.testing.assert_array_equal(a, sampler.epoch_indices(ts, 4, 2, seed=3, epoch=2))
  assert not np.array_equal(a, sampler.epoch_indices(ts, 4, 2, seed=3, epoch=3))
  assert not np.array_equal(a, sampler.epoch_indices(ts, 4, 2, seed=4, epoch=2))


def test_too_few_identities_with_both_modalities():
  ts = make_train_set()  # 7 identities have both modalities
  sampler.epoch_indices(ts, 7, 2, seed=0, epoch=0)
  with pytest.raises(DatasetError, match="7 identities with both"):
    sampler.epoch_indices(ts, 8, 2, seed=0, epoch=0)


def test_bad_p_k():
  with pytest.raises(ValueError, match="positive integers"):
    sampler.steps_per_epoch(make_train_set(), 0, 4)
