"""Training / evaluation pipelines on a small JPEG tree, checked against PIL-decoded sources."""
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import input_pipeline, sampler
from data_pipelines.records import INFRARED, VISIBLE, DatasetError, ImageRecord, TrainSet

H, W = 32, 16
P, K = 4, 2
NO_AUG = dict(pad=0, flip=0.0, erasing_prob=0.0)  # channel operations only
GRAY = np.array([0.2989, 0.5870, 0.1140])


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
  """6 identities with 3 visible (cam1/cam2) and 2 infrared (cam3) images; pid 6 visible only."""
  root = str(tmp_path_factory.mktemp("sysu"))
  rng = np.random.default_rng(0)
  records = []
  for pid in range(7):
    shots = [(1 + n % 2, VISIBLE) for n in range(3)] + ([(3, INFRARED)] * 2 if pid < 6 else [])
    for n, (cam, modality) in enumerate(shots):
      path = f"cam{cam}/{pid:04d}/{n:04d}.jpg"
      os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
      # Colour infrared sources too, so "left unchanged" is distinguishable from gray.
      Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
          os.path.join(root, path), quality=90)
      records.append(ImageRecord(path, pid, cam, modality))
  return TrainSet(root, tuple(records), 7)


def source(ts, index):
  return np.asarray(Image.open(os.path.join(ts.root, ts.records[index].path)).convert("RGB"))


def stream(ts, **kwargs):
  args = dict(P=P, K=K, height=H, width=W, seed=3, num_steps=4, threads=2)
  args.update(kwargs)
  return list(input_pipeline.train_dataset(ts, **args))


def test_batch_layout(train_set):
  batches = stream(train_set, num_steps=3)
  b = P * K
  for batch in batches:
    assert batch["images"].shape == (3 * b, H, W, 3) and batch["images"].dtype == np.uint8
    for key in ("labels", "modality", "view", "camid", "desc"):
      assert batch[key].shape == (3 * b,) and batch[key].dtype == np.int32, key
    np.testing.assert_array_equal(batch["view"], np.repeat([0, 1, 2], b))
    np.testing.assert_array_equal(batch["modality"], np.repeat([0, 0, 1], b))
    v, vc, r = np.split(batch["desc"], 3)
    np.testing.assert_array_equal(v, vc)  # Vc is made from the same visible images
    labels = np.split(batch["labels"], 3)
    np.testing.assert_array_equal(labels[0], labels[1])
    np.testing.assert_array_equal(labels[0], labels[2])
    for i, index in enumerate(batch["desc"]):
      record = train_set.records[index]
      assert record.pid == batch["labels"][i] and record.camid == batch["camid"][i]
      assert record.modality == (VISIBLE if i < 2 * b else INFRARED)
    ids = labels[0].reshape(P, K)
    assert np.all(ids == ids[:, :1]) and len(set(ids[:, 0])) == P and 6 not in ids


def test_views_content_without_geometric_augmentation(train_set):
  batch = stream(train_set, num_steps=1, aug=NO_AUG)[0]
  b = P * K
  images = batch["images"].astype(int)
  modes_ir = []
  for i in range(b):
    v_src = source(train_set, batch["desc"][i]).astype(int)
    r_src = source(train_set, batch["desc"][2 * b + i]).astype(int)
    np.testing.assert_array_equal(images[i], v_src)  # V: the decoded source
    vc = images[b + i]
    assert np.all(vc == vc[:, :, :1])  # Vc: one source channel in all three
    assert any(np.array_equal(vc[:, :, 0], v_src[:, :, c]) for c in range(3))
    ir = images[2 * b + i]
    if np.array_equal(ir, r_src):
      modes_ir.append("kept")
    elif any(np.array_equal(ir, np.repeat(r_src[:, :, c:c + 1], 3, 2)) for c in range(3)):
      modes_ir.append("channel")
    else:
      gray = np.round(r_src @ GRAY)
      assert np.all(ir == ir[:, :, :1]) and np.abs(ir[:, :, 0] - gray).max() <= 1
      modes_ir.append("gray")
  assert "channel" in modes_ir


def test_views_with_full_augmentation(train_set):
  batch = stream(train_set, num_steps=2, aug=dict(erasing_prob=0.0))[1]
  b = P * K
  vc = batch["images"][b:2 * b]
  assert np.all(vc == vc[..., :1])  # channel exchange survives padding, crop and flip
  plain = stream(train_set, num_steps=2, aug=NO_AUG)[1]
  assert not np.array_equal(batch["images"][:b], plain["images"][:b])
  erased = stream(train_set, num_steps=1, aug=dict(erasing_prob=1.0, pad=0, flip=0.0,
                                                    channel_exchange=False, adaptive_gray=False))[0]
  fill = np.all(erased["images"] == np.array([123, 117, 104], np.uint8), axis=-1)
  assert np.all(fill.reshape(3 * b, -1).any(axis=1))  # every image has its mean-filled rectangle


def test_resume_reproduces_uninterrupted_stream(train_set):
  steps = sampler.steps_per_epoch(train_set, P, K)  # 3: the streams cross epochs
  assert steps == 3
  full = stream(train_set, num_steps=7, threads=2)
  resumed = stream(train_set, start_step=4, num_steps=3, threads=1)
  for a, b in zip(full[4:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert not np.array_equal(full[0]["desc"], full[3]["desc"])  # epochs differ


def test_resume_does_not_read_skipped_steps(train_set, tmp_path):
  epoch = sampler.epoch_indices(train_set, P, K, seed=3, epoch=0)
  later = set(epoch[1:].ravel().tolist())
  only_first = [i for i in epoch[0].ravel().tolist() if i not in later]
  assert only_first
  ts = _copy_with_truncated(train_set, tmp_path, only_first[0])
  resumed = stream(ts, start_step=1, num_steps=2)
  full = stream(train_set, start_step=1, num_steps=2)
  np.testing.assert_array_equal(resumed[1]["images"], full[1]["images"])


def test_hosts_partition_the_global_batch(train_set):
  single = stream(train_set, num_steps=2)
  hosts = [stream(train_set, num_steps=2, process_index=h, process_count=2) for h in range(2)]
  for step in range(2):
    for key in single[step]:
      whole = np.split(single[step][key], 3)
      parts = [np.split(host[step][key], 3) for host in hosts]
      for v in range(3):  # per view, host 0's identities then host 1's
        np.testing.assert_array_equal(whole[v], np.concatenate([parts[0][v], parts[1][v]]),
                                      err_msg=key)
    assert hosts[0][step]["images"].shape[0] == 3 * P * K // 2
  with pytest.raises(ValueError, match="P=4 identities per step must divide evenly among 3"):
    input_pipeline.train_dataset(train_set, P=4, K=K, height=H, width=W, seed=0, process_count=3)


def test_decoded_cache_gives_identical_batches(train_set):
  a = stream(train_set, num_steps=3, cache_decoded=False)
  b = stream(train_set, num_steps=3, cache_decoded=True)
  for x, y in zip(a, b, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _copy_with_truncated(ts, tmp_path, index):
  """A copy of the tree in which record `index` is a truncated JPEG."""
  root = tmp_path / "broken"
  for i, record in enumerate(ts.records):
    data = open(os.path.join(ts.root, record.path), "rb").read()
    target = root / record.path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[:len(data) // 2] if i == index else data)
  return TrainSet(str(root), ts.records, ts.num_classes)


@pytest.mark.parametrize("cache", [False, True])
def test_truncated_jpeg_names_the_file(train_set, tmp_path, cache):
  bad = int(sampler.epoch_indices(train_set, P, K, seed=3, epoch=0)[1, 0, 0])  # used at step 1
  ts = _copy_with_truncated(train_set, tmp_path, bad)
  with pytest.raises(DatasetError, match=train_set.records[bad].path):
    stream(ts, num_steps=3, cache_decoded=cache)


def test_eval_dataset_padding_flip_and_order(train_set):
  records = train_set.records[3:8]  # 2 infrared, then 3 visible
  batches = list(input_pipeline.eval_dataset(train_set.root, records, height=H, width=W,
                                             batch_size=2, flip=True))
  assert len(batches) == 3
  for batch in batches:
    assert batch["images"].shape == batch["images_flipped"].shape == (2, H, W, 3)
    assert batch["images"].dtype == np.uint8 and batch["mask"].dtype == bool
    assert batch["modality"].dtype == np.int32
    np.testing.assert_array_equal(batch["images_flipped"], batch["images"][:, :, ::-1])
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(batches[2]["images"][1], batches[2]["images"][0])  # padding row
  images = np.concatenate([b["images"] for b in batches])[:5]
  modality = np.concatenate([b["modality"] for b in batches])[:5]
  for i, record in enumerate(records):
    expected = np.asarray(Image.open(os.path.join(train_set.root, record.path)).convert("RGB"))
    np.testing.assert_array_equal(images[i], expected)
    assert modality[i] == record.modality
  plain = next(input_pipeline.eval_dataset(train_set.root, records, height=H, width=W,
                                            batch_size=8))
  assert set(plain) == {"images", "modality", "mask"} and plain["mask"].sum() == 5


def test_eval_truncated_jpeg_names_the_file(train_set, tmp_path):
  ts = _copy_with_truncated(train_set, tmp_path, 4)
  with pytest.raises(DatasetError, match=train_set.records[4].path):
    list(input_pipeline.eval_dataset(ts.root, ts.records, height=H, width=W, batch_size=4))


def test_normalize():
  x = np.array([[0, 0, 0], [255, 255, 255], [123, 117, 104]], np.uint8)
  got = np.asarray(input_pipeline.normalize(x, input_pipeline.CLIP_MEAN, input_pipeline.CLIP_STD))
  mean, std = np.array(input_pipeline.CLIP_MEAN), np.array(input_pipeline.CLIP_STD)
  np.testing.assert_allclose(got[0], -mean / std, rtol=1e-6)
  np.testing.assert_allclose(got[1], (1 - mean) / std, rtol=1e-6)
  assert got.dtype == np.float32 and np.abs(got[2]).max() < 0.01  # the erasing fill


def test_reexports_the_sampler_formula(train_set):
  assert input_pipeline.steps_per_epoch(train_set, P, K) == 3  # ceil(max(21, 12) / 8)
  stream_ = input_pipeline.train_dataset(train_set, P=P, K=K, height=H, width=W, seed=0,
                                         num_steps=0)
  assert stream_.steps_per_epoch == 3 and stream_.batch_size == 3 * P * K
  assert list(stream_) == []
