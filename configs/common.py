"""Shared pieces of every experiment config; each configs/<name>.py starts from `base_config()`.

Every value the trainer reads lives here or in the data set's config file: nothing is buried in code.
Every value has a type the command line can parse: an option whose default is "not set" is a typed
`none(int)` reference, so `--config.loss.cmsp.hardest_k=3` overrides it (ml_collections refuses to
override a plain None). eees_jax/config_validation.py checks every value before a run starts.
"""
from __future__ import annotations

import ml_collections


def none(field_type: type) -> ml_collections.FieldReference:
  """A value that is unset (None) by default but can be set from the command line."""
  return ml_collections.FieldReference(None, field_type=field_type)


def loss_config(*, ese: bool = True, cvsc: bool = True, cmsp: bool = True) -> ml_collections.ConfigDict:
  """The EEES objective (SPEC section 3); each term has a switch and a weight."""
  return ml_collections.ConfigDict(dict(
      id=dict(enabled=True, weight=1.0, label_smoothing=0.0),
      wrt=dict(enabled=True, weight=0.15),
      ese=dict(enabled=ese, weight=1.0, tau=0.02, within_modality=False),
      pair=dict(kind="sum", num_heads=8),
      cvsc=dict(enabled=cvsc, weight=1.0, tau=0.02, kd_temperature=4.0),
      # intra: "mean" | "hardest" (the hardest_k largest intra distances, CSDN's K - 1);
      # distance: "euclidean" | "cosine".
      cmsp=dict(enabled=cmsp, weight=1.0, intra="mean", distance="euclidean", hardest_k=none(int)),
      # CSDN's distance consistency on f and v; hardest_k unset: mean over all intra partners.
      dc=dict(enabled=False, weight=1.0, hardest_k=none(int), distance="euclidean"),
  ))


# The ablation of SPEC section 3: the rows of the paper's table, as config overrides.
ABLATION_ROWS = {
    "baseline": {"loss.ese.enabled": False, "loss.cvsc.enabled": False, "loss.cmsp.enabled": False},
    "ese": {"loss.cvsc.enabled": False, "loss.cmsp.enabled": False},
    "ese_cvsc": {"loss.cmsp.enabled": False},
    "ese_cmsp": {"loss.cvsc.enabled": False},
    "full": {},
}


def rn50_vision() -> ml_collections.ConfigDict:
  """CLIP RN50 image tower with the EEES changes (two stems, last stride 1)."""
  return ml_collections.ConfigDict(dict(
      kind="resnet", layers=(3, 4, 6, 3), width=64, output_dim=1024, heads=32,
      pos_grid=7, last_stride=1, interpolation="bicubic", num_modalities=2,
      # Stages recomputed in the backward pass instead of stored (stem, layer1..layer4): less
      # memory, more compute, same function (eees_jax/models/clip_resnet.py, BENCHMARKS.md).
      remat=()))


def clip_text_tower(embed_dim: int = 1024) -> ml_collections.ConfigDict:
  """CLIP's text transformer (RN50 joint space is 1024-d)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=49408, context_length=77, width=512, heads=8, layers=12, embed_dim=embed_dim,
      eos_token_id=none(int)))   # unset: end of text = argmax token (OpenAI); else that id


def base_config() -> ml_collections.ConfigDict:
  """The full recipe of SPEC sections 1-3 with CLIP RN50; data set configs fill in `dataset`."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict(dict(
      name="sysu",            # sysu | regdb | llcm | synthetic (data_pipelines/registry.py)
      root="",                # the unpacked data set folder
      source="folders",       # folders: read the images under `root`; tfds: read the splits
                              # prepared by data_pipelines/tfds_builders.py from `tfds_data_dir`
      tfds_data_dir="",       # the TFDS data_dir the data set was prepared into (source=tfds)
      split=1,                # RegDB split (1..10)
      holdout=False,          # True: train on exp/train_id.txt only, evaluate on exp/val_id.txt
                              # (SYSU layout): tune here, never on the test ids
      descriptions="",        # JSONL of SPEC section 4; relative paths are relative to `root`
      description_field="auto",  # description | rewritten | auto (rewritten when present)
  ))

  c.input = ml_collections.ConfigDict(dict(
      height=288, width=144, P=8, K=4,
      cache_decoded=False, threads=0,   # 0: tf.data AUTOTUNE
      # Images per jitted test-time feature call (global; a multiple of the device count). The
      # evaluation's peak memory grows with it: RN50 at 288x144 on CPU peaks at 8.0 GiB with 64,
      # 2.9 GiB with 16, under training's 3.5 GiB (BENCHMARKS.md, bench/memory.py).
      eval_batch_size=16,
      aug=dict(pad=10, flip=0.5, erasing_prob=0.5, erasing_area=(0.02, 0.4),
               erasing_aspect=(0.3, 3.3), gray_prob=0.5, channel_exchange=True),
  ))

  c.model = ml_collections.ConfigDict(dict(
      vision=rn50_vision(),
      text=clip_text_tower(),
      gem_p=3.0,
      # True: the image tower's BatchNorm layers keep the checkpoint's running statistics and
      # normalise with them in training too (frozen BN, as when fine-tuning detectors); the BNNecks
      # still train. False: AGW's rule, every BatchNorm re-estimated on the training batches.
      freeze_encoder_bn=False,
      dtype="float32",          # compute dtype: float32 | bfloat16 (parameters stay float32)
      init=dict(
          checkpoint="",        # OpenAI .pt/.safetensors, Hugging Face folder, or convert_clip output
          load=("vision", "text"),  # which towers take the checkpoint's weights; heads start fresh
      ),
  ))

  c.text = ml_collections.ConfigDict(dict(
      tokenizer="clip",         # "clip": the CLIP BPE vocabulary; or a Hugging Face checkpoint folder
      trainable=False,          # False: embed every description once and cache it in the workdir
      embed_batch_size=256,
  ))

  c.loss = loss_config()

  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, weight_decay=5e-4, b1=0.9, b2=0.999, grad_clip=0.0,
      # Parameter groups: the first regex (on '/'-joined parameter paths) that matches wins.
      # A multiplier of 0 freezes the parameter (no update, no weight decay).
      groups=(
          (r"^model/bnneck_[fv]/bias$", 0.0),       # BNNeck bias frozen (SPEC section 1)
          (r"^model/classifier_[fv]/", 2.0),        # classifiers at 2x
          (r"^text/", 1.0),                         # only present when text.trainable
          (r".*", 1.0),
      ),
      warmup_epochs=10, warmup_from=0.01, milestones=(40, 70), gamma=0.1,
      # Linear probe, then fine-tune: > 0 gives the parameters matching probe_frozen no update
      # for this many epochs (the schedule runs on; they join it where it is then).
      probe_epochs=0.0, probe_frozen=r"^model/encoder/",
  ))

  c.train = ml_collections.ConfigDict(dict(
      epochs=120,
      log_every_steps=20,
      checkpoint_every_steps=500,
      keep_checkpoints=2,
      eval_every_epochs=10,
      max_steps=-1,             # > 0 stops early (tests, benchmarks)
  ))

  c.eval = ml_collections.ConfigDict(dict(
      flip=True,
      modes=("all", "indoor"),  # SYSU-MM01 search modes
      shots=(1,),
      trials=10,
      gallery_source="random",  # SYSU-MM01: random (the AGW draws) | official (exp/rand_perm_cam.mat)
      llcm_layout="deen",       # LLCM: deen (DEEN's test.py, published numbers) | query_gallery
      # k-reciprocal re-ranking (Zhong et al. 2017): adds "(re-ranked)" twins of every setting.
      rerank=dict(enabled=False, k1=20, k2=6, lambda_value=0.3),
      ranked_list_queries=8,
      best_metric="mAP",
      # Text-to-person rows in the final report (SYSU-MM01 layout; needs a description of every
      # visible test image): text -> infrared, text -> visible, infrared + text -> visible.
      text_retrieval=False,
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                  # -1: every device on the data axis
      fsdp=False,               # True: split large params and Adam moments over "data" (FSDP)
      fsdp_min_size=2**18,      # FSDP leaves of fewer elements stay replicated
  ))
  return c
