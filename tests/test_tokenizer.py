"""CLIP tokenizer against OpenAI's simple_tokenizer.py and transformers' CLIPTokenizer."""
import json

import numpy as np
import pytest

from eees_jax.models.tokenizer import Tokenizer
from _torch_refs import simple_tokenizer

SENTENCES = [
    "A woman with long black hair, wearing a red T-shirt and blue jeans.",
    "The person\u2019s bag isn't visible!!  ",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 123 4.5kg &amp; stuff &lt;b&gt;",
    "MIXED Case ... ??? \t\n new\u00a0line",
    "",
    "   ",
    "hello<|endoftext|>world",
    "\ufb01ne \uff46\uff55\uff4c\uff4c width",
    "emoji \U0001F600 and \u4e2d\u6587\u5b57\u7b26 test, \u00fcber-cool; (x2) [done]",
    "They're we've I'm you'll he'd -- it's",
    "x" * 300,
    "A man in a grey hoodie and dark trousers carries a backpack on his left shoulder. " * 6,
]


@pytest.fixture(scope="module")
def openai():
  return simple_tokenizer().SimpleTokenizer()


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.from_bpe_file()


def openai_tokenize(st, texts, context_length=77):
  """clip.tokenize(texts, truncate=True) (clip/clip.py), on OpenAI's SimpleTokenizer."""
  sot, eot = st.encoder["<|startoftext|>"], st.encoder["<|endoftext|>"]
  out = np.zeros((len(texts), context_length), np.int64)
  for i, text in enumerate(texts):
    tokens = [sot] + st.encode(text) + [eot]
    if len(tokens) > context_length:
      tokens = tokens[:context_length]
      tokens[-1] = eot
    out[i, :len(tokens)] = tokens
  return out


def test_encode_matches_openai(openai, tok):
  assert tok.encode(SENTENCES) == [openai.encode(s) for s in SENTENCES]
  assert tok.vocab_size == len(openai.encoder) == 49408


def test_tokenize_matches_clip_tokenize(openai, tok):
  got = tok.tokenize(SENTENCES)
  assert got.dtype == np.int32 and got.shape == (len(SENTENCES), 77)
  np.testing.assert_array_equal(got, openai_tokenize(openai, SENTENCES))


def test_truncation_keeps_end_of_text_and_counts(openai, tok):
  long_text = SENTENCES[-1]
  n = len(openai.encode(long_text)) + 2
  assert n > 77
  np.testing.assert_array_equal(tok.count_tokens([long_text, "a photo"]), [n, 4])
  row = tok.tokenize([long_text])[0]
  assert row[0] == 49406 and row[76] == 49407 and (row[1:76] < 49406).all()
  text = "a b c d e f g h i"
  short = Tokenizer.from_bpe_file(context_length=8).tokenize([text])[0]
  np.testing.assert_array_equal(short, openai_tokenize(openai, [text], context_length=8)[0])
  np.testing.assert_array_equal(short[1:7], openai.encode(text)[:6])


@pytest.fixture(scope="module")
def hf_folder(openai, tmp_path_factory):
  """vocab.json + merges.txt written from OpenAI's tokenizer tables (Hugging Face layout)."""
  folder = tmp_path_factory.mktemp("hf_tokenizer")
  with open(folder / "vocab.json", "w", encoding="utf-8") as f:
    json.dump(openai.encoder, f, ensure_ascii=False)
  merges = sorted(openai.bpe_ranks, key=openai.bpe_ranks.get)
  with open(folder / "merges.txt", "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
  return folder


def test_matches_transformers_clip_tokenizer(hf_folder, tok):
  import transformers
  hf = transformers.CLIPTokenizer.from_pretrained(str(hf_folder), local_files_only=True)
  # Left out: texts whose OpenAI cleaning (ftfy's curly-quote / ligature / full-width repairs, HTML
  # unescaping) changes them; transformers' tokenizers-backed CLIPTokenizer applies neither.
  texts = [s for i, s in enumerate(SENTENCES) if i not in (1, 2, 7)]
  ids = hf(texts, truncation=True, max_length=77)["input_ids"]
  ours = tok.tokenize(texts)
  for row, ref in zip(ours, ids):
    assert list(row[:len(ref)]) == ref and not row[len(ref):].any()


def test_load_from_hugging_face_folder(hf_folder, tok):
  from_folder = Tokenizer.load(str(hf_folder))
  np.testing.assert_array_equal(from_folder.tokenize(SENTENCES), tok.tokenize(SENTENCES))


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    Tokenizer.from_bpe_file(str(tmp_path / "nope.txt.gz"))
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    Tokenizer.load(str(tmp_path))
  with pytest.raises(TypeError):
    Tokenizer.from_bpe_file().tokenize("one string")


def test_build_tokenizer_from_config_value(hf_folder, tok, tmp_path):
  from eees_jax.models.tokenizer import build_tokenizer
  np.testing.assert_array_equal(build_tokenizer("clip").tokenize(SENTENCES), tok.tokenize(SENTENCES))
  np.testing.assert_array_equal(build_tokenizer(str(hf_folder)).tokenize(SENTENCES),
                                tok.tokenize(SENTENCES))
  assert build_tokenizer("clip", context_length=10).tokenize(["a"]).shape == (1, 10)
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    build_tokenizer(str(tmp_path / "nothing-here"))
