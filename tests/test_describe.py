"""Description generation end to end with tiny random LLaVA and causal LM models built locally.

Oracles: every description is compared with a plain one-image-at-a-time generate() call of the same
saved model (independent of the batching, padding and resume code); the token-length flag with
OpenAI's own simple_tokenizer; the other flags with hand-made cases.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")   # requirements-describe.txt / requirements-test.txt

from data_pipelines import registry  # noqa: E402
from data_pipelines.records import DatasetError, ImageRecord, INFRARED, VISIBLE  # noqa: E402
from eees_jax import describe  # noqa: E402
from eees_jax.describe_lib import models as describe_models  # noqa: E402
from eees_jax.describe_lib import quality  # noqa: E402
from eees_jax.describe_lib.errors import DescribeError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a the person man woman wears wearing shirt jacket black white red blue dark light hair "
         "short long bag backpack shoes trousers shorts skirt carries with and in of is , . : "
         "USER ASSISTANT describe this image infrared colours do not guess").split()
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}USER : {% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT :{% endif %}")


def _tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")   # joins the words with spaces
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>", chat_template=CHAT)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """Tiny models run fastest on one thread, and the test machine's cores are shared."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
  """(llava folder, causal LM folder): random weights, 16x16 images, 8x8 patches."""
  from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                            LlavaForConditionalGeneration, LlavaProcessor)
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  base = tmp_path_factory.mktemp("models")
  tok = _tokenizer()
  tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
  processor = LlavaProcessor(
      image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16},
                                            crop_size={"height": 16, "width": 16}),
      tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", chat_template=CHAT,
      num_additional_image_tokens=1)
  text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2,
              initializer_range=0.5)   # wide weights: outputs that depend on image and prompt
  config = LlavaConfig(
      vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=16, patch_size=8,
                                     projection_dim=16, initializer_range=0.5),
      text_config=LlamaConfig(**text), image_token_index=tok.convert_tokens_to_ids("<image>"),
      image_seq_length=4, vision_feature_select_strategy="default", vision_feature_layer=-2)
  torch.manual_seed(0)
  vlm_dir = str(base / "llava")
  LlavaForConditionalGeneration(config).save_pretrained(vlm_dir)
  processor.save_pretrained(vlm_dir)
  torch.manual_seed(1)
  lm_dir = str(base / "rewriter")
  LlamaForCausalLM(LlamaConfig(**text)).save_pretrained(lm_dir)
  _tokenizer().save_pretrained(lm_dir)
  return vlm_dir, lm_dir


def _write_images(root, n_ids=2, per_cam=2):
  """A SYSU-like tree: cam1 (visible) and cam3 (infrared), random 40x20 JPEGs."""
  rng = np.random.default_rng(0)
  recs = []
  for pid in range(1, n_ids + 1):
    for cam, modality in ((1, VISIBLE), (3, INFRARED)):
      for n in range(1, per_cam + 1):
        rel = f"cam{cam}/{pid:04d}/{n:04d}.jpg"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        pixels = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
        if modality == INFRARED:
          pixels = np.repeat(pixels[..., :1], 3, axis=-1)
        Image.fromarray(pixels).save(os.path.join(root, rel), quality=90)
        recs.append(ImageRecord(rel, pid - 1, cam, modality))
  return recs


@pytest.fixture
def data(tmp_path, monkeypatch):
  """(root, records): the fake data set's reader returns `records` for the train split."""
  root = str(tmp_path / "data")
  recs = _write_images(root)
  monkeypatch.setattr(registry.get("sysu"), "describe_records",
                      lambda root_, split, config: list(recs))
  return root, recs


def _config(**overrides):
  spec = importlib.util.spec_from_file_location("describe_config",
                                                os.path.join(REPO, "configs", "describe.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.batch_size = 3
  c.generation.max_new_tokens = 6
  c.rewrite.generation.max_new_tokens = 5
  c.rewrite.batch_size = 2
  for k, v in overrides.items():
    c[k] = v
  return c


def _run(config, root, out, model, **kw):
  return describe.run(config, dataset="sysu", root=root, out=out, model=model, device="cpu",
                      progress=False, **kw)


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _oracle_descriptions(vlm_dir, root, recs, config):
  """Plain loop: one image, its modality's prompt, greedy decoding, no batching or padding."""
  from transformers import AutoProcessor, LlavaForConditionalGeneration
  processor = AutoProcessor.from_pretrained(vlm_dir)
  model = LlavaForConditionalGeneration.from_pretrained(vlm_dir).eval()
  out = {}
  for r in recs:
    prompt = config.prompts["visible" if r.modality == VISIBLE else "infrared"]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True)
    image = Image.open(os.path.join(root, r.path)).convert("RGB")
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
      ids = model.generate(**inputs, max_new_tokens=config.generation.max_new_tokens, do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1]:]
    out[r.path] = " ".join(processor.decode(new, skip_special_tokens=True).split())
  return out


def _oracle_rewrites(lm_dir, descriptions, config):
  from transformers import AutoModelForCausalLM, AutoTokenizer
  tok = AutoTokenizer.from_pretrained(lm_dir)
  model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
  out = {}
  for key, d in descriptions.items():
    msg = config.rewrite.prompt.replace("{description}", d)
    text = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok([text], return_tensors="pt")
    with torch.no_grad():
      gen = model.generate(**ids, max_new_tokens=config.rewrite.generation.max_new_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id)
    out[key] = " ".join(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split())
  return out


@pytest.fixture(scope="module")
def oracle_cache():
  return {}


def _oracle(oracle_cache, vlm_dir, root, recs, config):
  key = ("vlm", tuple(r.path for r in recs))
  if key not in oracle_cache:
    oracle_cache[key] = _oracle_descriptions(vlm_dir, root, recs, config)
  return oracle_cache[key]


def test_describes_every_image_with_its_modality_prompt(tiny_models, data, tmp_path, oracle_cache):
  vlm_dir, _ = tiny_models
  root, recs = data
  config = _config()
  out = str(tmp_path / "descriptions.jsonl")
  summary = _run(config, root, out, vlm_dir)

  lines = _lines(out)
  assert [r["image"] for r in lines] == sorted(r.path for r in recs)   # one each, sorted
  expected = _oracle(oracle_cache, vlm_dir, root, recs, config)
  by_path = {r.path: r for r in recs}
  for rec in lines:
    modality = "visible" if by_path[rec["image"]].modality == VISIBLE else "infrared"
    assert rec["modality"] == modality
    assert rec["prompt"] == config.prompts[modality]
    assert rec["description"] == expected[rec["image"]]
    assert rec["model"] == os.path.normpath(vlm_dir)
    assert rec["rewritten"] is None and rec["rewrite_model"] is None and rec["rewrite_prompt"] is None
    assert rec["generation"]["max_new_tokens"] == 6 and rec["generation"]["do_sample"] is False
    assert rec["generation"]["dtype"] == "float32"
    assert list(rec) == ["image", "modality", "description", "rewritten", "model", "prompt",
                         "rewrite_model", "rewrite_prompt", "generation", "flags"]
  assert summary.images == len(recs) and summary.newly_described == len(recs)
  assert summary.described_before == 0
  assert summary.empty == sum(not d for d in expected.values())
  # The prompts must reach the model: the wrong prompt gives other text for this tiny model.
  swapped = _config()
  swapped.prompts.visible, swapped.prompts.infrared = config.prompts.infrared, config.prompts.visible
  assert _oracle_descriptions(vlm_dir, root, recs, swapped) != expected

  # A second run finds everything done and rewrites the same file.
  before = open(out, "rb").read()
  again = _run(config, root, out, vlm_dir)
  assert again.newly_described == 0 and again.described_before == len(recs)
  assert open(out, "rb").read() == before


def test_resume_after_interruption_neither_repeats_nor_loses(tiny_models, data, tmp_path,
                                                             monkeypatch, oracle_cache):
  vlm_dir, _ = tiny_models
  root, recs = data
  config = _config()
  out = str(tmp_path / "d.jsonl")
  seen = []
  original = describe_models.VisionLanguageDescriber.describe

  def crash_on_second_batch(self, images, prompts):
    if seen:
      raise KeyboardInterrupt   # the machine goes away mid-run
    seen.append(len(images))
    return original(self, images, prompts)

  monkeypatch.setattr(describe_models.VisionLanguageDescriber, "describe", crash_on_second_batch)
  with pytest.raises(KeyboardInterrupt):
    _run(config, root, out, vlm_dir)
  first = _lines(out)
  assert len(first) == config.batch_size   # the finished batch is on disk, nothing else

  counted = []

  def counting(self, images, prompts):
    counted.append(len(images))
    return original(self, images, prompts)

  monkeypatch.setattr(describe_models.VisionLanguageDescriber, "describe", counting)
  summary = _run(config, root, out, vlm_dir)
  assert sum(counted) == len(recs) - config.batch_size   # nothing described twice
  assert summary.described_before == config.batch_size
  final = _lines(out)
  assert [r["image"] for r in final] == sorted(r.path for r in recs)
  expected = _oracle(oracle_cache, vlm_dir, root, recs, config)
  assert {r["image"]: r["description"] for r in final} == expected
  kept = {r["image"]: r for r in final}
  for rec in first:
    assert kept[rec["image"]] == rec


def test_limit_then_full_run(tiny_models, data, tmp_path):
  vlm_dir, _ = tiny_models
  root, recs = data
  out = str(tmp_path / "d.jsonl")
  s1 = _run(_config(), root, out, vlm_dir, limit=5)
  assert s1.images == 5 and [r["image"] for r in _lines(out)] == sorted(r.path for r in recs)[:5]
  s2 = _run(_config(), root, out, vlm_dir)
  assert s2.newly_described == len(recs) - 5
  assert [r["image"] for r in _lines(out)] == sorted(r.path for r in recs)


def test_partial_last_line_is_repaired(tiny_models, data, tmp_path, caplog, oracle_cache):
  vlm_dir, _ = tiny_models
  root, recs = data
  config = _config()
  out = str(tmp_path / "d.jsonl")
  _run(config, root, out, vlm_dir)
  lines = open(out, "rb").read().split(b"\n")[:-1]
  # A crash in the middle of writing the last record: half a line, no newline.
  with open(out, "wb") as f:
    f.write(b"\n".join(lines[:-1]) + b"\n" + lines[-1][:len(lines[-1]) // 2])
  with caplog.at_level(logging.WARNING):
    summary = _run(config, root, out, vlm_dir)
  assert summary.newly_described == 1
  assert any("partial last line" in m and out in m for m in caplog.messages)
  final = _lines(out)
  assert [r["image"] for r in final] == sorted(r.path for r in recs)
  expected = _oracle(oracle_cache, vlm_dir, root, recs, config)
  assert {r["image"]: r["description"] for r in final} == expected


def test_damaged_middle_line_is_an_error(tiny_models, data, tmp_path):
  vlm_dir, _ = tiny_models
  root, _ = data
  out = tmp_path / "d.jsonl"
  out.write_text('{"image": "x"\n')
  with pytest.raises(DescribeError, match=r"d\.jsonl, line 1: not a JSON record"):
    _run(_config(), root, str(out), vlm_dir)


def test_resume_with_other_prompt_is_refused(tiny_models, data, tmp_path):
  vlm_dir, _ = tiny_models
  root, _ = data
  out = str(tmp_path / "d.jsonl")
  _run(_config(), root, out, vlm_dir, limit=2)
  other = _config()
  other.prompts.visible = "Describe the clothes."
  with pytest.raises(DescribeError, match="prompt="):
    _run(other, root, out, vlm_dir)


def test_rewrite_stage(tiny_models, data, tmp_path, monkeypatch, oracle_cache):
  vlm_dir, lm_dir = tiny_models
  root, recs = data
  config = _config(max_clip_tokens=6)   # short random texts: some over, some within
  out = str(tmp_path / "d.jsonl")
  _run(config, root, out, vlm_dir, limit=4)          # stage 1 only for some images
  counted = []
  original = describe_models.VisionLanguageDescriber.describe
  monkeypatch.setattr(describe_models.VisionLanguageDescriber, "describe",
                      lambda self, im, p: counted.append(len(im)) or original(self, im, p))
  summary = _run(config, root, out, vlm_dir, rewrite_model=lm_dir)
  assert sum(counted) == len(recs) - 4 and summary.newly_rewritten == len(recs)

  final = _lines(out)
  assert [r["image"] for r in final] == sorted(r.path for r in recs)
  descriptions = _oracle(oracle_cache, vlm_dir, root, recs, config)
  rewrites = _oracle_rewrites(lm_dir, descriptions, config)
  for rec in final:
    assert rec["description"] == descriptions[rec["image"]]   # both texts kept
    assert rec["rewritten"] == rewrites[rec["image"]]
    assert rec["rewrite_model"] == os.path.normpath(lm_dir)
    assert rec["rewrite_prompt"] == config.rewrite.prompt
    assert rec["generation"]["rewrite"]["max_new_tokens"] == 5
    assert (quality.EXCEEDS in rec["flags"]) == (_openai_count(rec["rewritten"]) > 6)
  assert 0 < sum(quality.EXCEEDS in r["flags"] for r in final) < len(final)
  # Describing more images into this file needs the rewrite model too.
  lines = open(out, "rb").read().split(b"\n")[:-1]
  with open(out, "wb") as f:
    f.write(b"\n".join(lines[:-1]) + b"\n")   # one image to describe again
  with pytest.raises(DescribeError, match="--rewrite_model="):
    _run(config, root, out, vlm_dir)


def test_unreadable_image_is_named(tiny_models, data, tmp_path):
  vlm_dir, _ = tiny_models
  root, recs = data
  bad = os.path.join(root, recs[1].path)
  with open(bad, "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(DescribeError, match=f"cannot read image {bad}"):
    _run(_config(), root, str(tmp_path / "d.jsonl"), vlm_dir)


def test_missing_model_folder_and_unknown_dataset(data, tmp_path):
  root, _ = data
  out = str(tmp_path / "d.jsonl")
  with pytest.raises(DescribeError, match="no such folder.*local folder.*hub name.*offline"):
    _run(_config(), root, out, str(tmp_path / "no_such_model"))
  # A bare org/name that is no local folder is tried on the hub: offline here (conftest).
  with pytest.raises(DescribeError, match="not a local folder.*hub name.*offline"):
    _run(_config(), root, out, "no-such-org/no-such-model")
  with pytest.raises(DatasetError, match="market1501"):
    describe.run(_config(), dataset="market1501", root=root, out=out, model=str(tmp_path),
                 progress=False)
  assert not os.path.exists(out)


def test_command_line_reports_errors(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
  cmd = [sys.executable, "-m", "eees_jax.describe", "--dataset=sysu", f"--root={tmp_path}",
         f"--out={tmp_path / 'd.jsonl'}", f"--model={tmp_path / 'nothing'}", "--device=cpu",
         "--config.batch_size=2"]
  res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 1
  assert f"error: --model={tmp_path / 'nothing'}: no such folder" in res.stderr
  res = subprocess.run(cmd[:1] + ["-m", "eees_jax.describe", "--dataset=market"] + cmd[4:],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode != 0 and "--dataset" in res.stderr


# ------------------------------------------------------------------------------------------------
# Token counting and flags.


def _openai_tokenizer():
  """OpenAI's own CLIP tokenizer, loaded by file path (clip/__init__ does not import here)."""
  spec = importlib.util.find_spec("clip")
  path = os.path.join(list(spec.submodule_search_locations)[0], "simple_tokenizer.py")
  stub = importlib.util.find_spec("ftfy") is None   # clip-anytorch is installed without its deps
  if stub:   # ASCII test texts: ftfy.fix_text is the identity on them
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda s: s)
  try:
    module_spec = importlib.util.spec_from_file_location("clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  finally:
    if stub:
      del sys.modules["ftfy"]
  return module.SimpleTokenizer()


def _openai_count(text, _cache={}):
  if "tok" not in _cache:
    _cache["tok"] = _openai_tokenizer()
  return len(_cache["tok"].encode(text)) + 2


def test_flags():
  count = _openai_count
  prompt = "Describe the pedestrian in this image in one or two sentences: their gender and hair."
  ok = "A man with short hair wearing a black jacket."
  assert quality.flags_for(ok, prompt, None, None, count, 77, 8) == []
  assert quality.flags_for("  ", prompt, None, None, count, 77, 8) == [quality.EMPTY]
  echo = "Sure. Describe the pedestrian in this image in one or two sentences."
  assert quality.flags_for(echo, prompt, None, None, count, 77, 8) == [quality.REPEATS_PROMPT]
  long = " ".join(["a man in a black jacket"] * 13)   # 78 words + 2 markers
  assert count(long) == 80
  assert quality.flags_for(long, prompt, None, None, count, 77, 8) == [quality.EXCEEDS]
  # With a rewrite, the length that counts is the rewrite's (the text the trainer reads).
  assert quality.flags_for(long, prompt, ok, "Rewrite: {description}", count, 77, 8) == []
  assert quality.flags_for(ok, prompt, "", "Rewrite: {description}", count, 77, 8) == [quality.EMPTY]
  # Repeating the description inside a rewrite is no echo; repeating the instruction is.
  rw_prompt = "Rewrite this description as one sentence in a fixed order please. {description}"
  assert not quality.repeats_prompt(ok, rw_prompt)
  assert quality.repeats_prompt("rewrite this description as one sentence in a fixed", rw_prompt)
  assert not quality.repeats_prompt("rewrite this description as one sentence in", rw_prompt)
  assert quality.repeats_prompt("hi: Short prompt!", "short prompt")


# ------------------------------------------------------------------------------------------------
# The real data set readers.


def _jpeg(root, rel, seed):
  os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (40, 20, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(os.path.join(root, rel))


def test_command_line_on_a_sysu_tree(tiny_models, tmp_path):
  """The command as a user runs it: the SYSU-MM01 reader, train + test, then the trainer's reader."""
  from data_pipelines import descriptions, sysu_mm01
  vlm_dir, _ = tiny_models
  root = str(tmp_path / "SYSU-MM01")
  for c in range(1, 7):
    os.makedirs(os.path.join(root, f"cam{c}"))
  os.makedirs(os.path.join(root, "exp"))
  for name, ids in (("train", "1,2"), ("val", "3"), ("test", "4")):
    with open(os.path.join(root, "exp", f"{name}_id.txt"), "w") as f:
      f.write(ids + "\n")
  expected = {}
  for pid in (1, 2, 3, 4):
    for cam in (2, 6):
      rel = f"cam{cam}/{pid:04d}/0001.jpg"
      _jpeg(root, rel, pid * 10 + cam)
      expected[rel] = "visible" if cam == 2 else "infrared"
  out = str(tmp_path / "descriptions.jsonl")
  cmd = [sys.executable, "-m", "eees_jax.describe", "--dataset=sysu", f"--root={root}", f"--out={out}",
         f"--model={vlm_dir}", "--device=cpu", "--splits=train,test", "--batch_size=2",
         "--config.generation.max_new_tokens=4", "--noprogress"]
  res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
                       capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "newly described:       8" in res.stdout
  lines = _lines(out)
  assert {r["image"]: r["modality"] for r in lines} == expected
  assert all(r["generation"]["max_new_tokens"] == 4 for r in lines)
  train = sysu_mm01.train_set(root).records
  assert len(descriptions.load_descriptions(out, train, "auto")) == len(train)   # trainer reads it
  assert descriptions.read_records(out).keys() == expected.keys()


def test_regdb_uses_the_union_of_its_splits(tiny_models, tmp_path):
  vlm_dir, _ = tiny_models
  root = str(tmp_path / "RegDB")
  os.makedirs(os.path.join(root, "idx"))
  # Split 1 trains on person 0 and tests on person 1; split 2 the reverse.
  for split, (train_pid, test_pid) in ((1, (0, 1)), (2, (1, 0))):
    for part, pid in (("train", train_pid), ("test", test_pid)):
      for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
        rel = f"{folder}/{pid}/{folder[0]}_{pid}.bmp"
        if not os.path.exists(os.path.join(root, rel)):
          _jpeg(root, rel, pid)
        with open(os.path.join(root, "idx", f"{part}_{modality}_{split}.txt"), "w") as f:
          f.write(f"{rel} {pid}\n")
  config = _config(regdb_splits=(1, 2))
  out = str(tmp_path / "d.jsonl")
  s = describe.run(config, dataset="regdb", root=root, out=out, model=vlm_dir, device="cpu",
                   progress=False)
  assert s.images == 4   # train lists of splits 1 and 2 cover both people
  assert {r["image"]: r["modality"] for r in _lines(out)} == {
      "Visible/0/V_0.bmp": "visible", "Visible/1/V_1.bmp": "visible",
      "Thermal/0/T_0.bmp": "infrared", "Thermal/1/T_1.bmp": "infrared"}
  with pytest.raises(DescribeError, match="--splits=val"):
    describe.run(config, dataset="regdb", root=root, out=out, model=vlm_dir, device="cpu",
                 splits=("val",), progress=False)
