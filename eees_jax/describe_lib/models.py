"""The two Hugging Face models of description generation (PyTorch; only this command imports torch).

Stage 1: a LLaVA-family vision-language model (AutoProcessor + LlavaForConditionalGeneration)
describes a batch of images, each with the prompt of its modality.
Stage 2 (optional): a text-only instruction model (AutoTokenizer + AutoModelForCausalLM) rewrites
each description into one CLIP-sized sentence.
Both generate batched with left padding, so every prompt ends where generation starts.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from eees_jax.describe_lib.errors import DescribeError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> torch.device:
  """The requested device, or the first GPU torch sees, or the CPU."""
  if not device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
  try:
    dev = torch.device(device)
  except RuntimeError as e:
    raise DescribeError(f"--device={device!r} is not a torch device (use cpu or cuda): {e}") from e
  if dev.type == "cuda" and not torch.cuda.is_available():
    raise DescribeError(f"--device={device} but torch sees no CUDA GPU on this machine "
                        f"(torch {torch.__version__}); use --device=cpu or a CUDA build of torch")
  return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
  """Parameter dtype: "auto" is float16 on a GPU (LLaVA-1.5's released precision), else float32."""
  if name == "auto":
    return torch.float16 if device.type == "cuda" else torch.float32
  if name not in _DTYPES:
    raise DescribeError(f"config dtype={name!r} is not one of auto, {', '.join(_DTYPES)}")
  return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
  return str(dtype).removeprefix("torch.")


def model_source(name: str, flag: str) -> str:
  """Checks a model argument: an existing local folder, or something that can only be a hub name.

  Returns the folder (normalised) or the hub name. Paths that cannot be hub names ("./x", "/x",
  "a/b/c") must exist locally; "org/name" or "name" that is not a local folder is tried on the hub.
  """
  expanded = os.path.expanduser(name)
  if os.path.isdir(expanded):
    return os.path.normpath(expanded)
  hint = (f"{flag} must be a local folder holding a saved model (config.json and weights) or a "
          f"Hugging Face hub name such as llava-hf/llava-1.5-7b-hf; hub names need network "
          f"access, and this machine may be offline (then download the model elsewhere and pass "
          f"its folder)")
  if os.path.exists(expanded):
    raise DescribeError(f"{flag}={name}: is a file, not a folder. {hint}")
  if (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
      or any(not part for part in name.split("/"))):
    raise DescribeError(f"{flag}={name}: no such folder. {hint}")
  return name


def _load_error(flag: str, name: str, what: str, e: Exception) -> DescribeError:
  cause = f"{type(e).__name__}: {' '.join(str(e).split())}"   # one line
  if os.path.isdir(name):
    return DescribeError(f"{flag}={name}: cannot load {what} from this folder ({cause}); it must "
                         f"hold a model saved with save_pretrained")
  return DescribeError(
      f"{flag}={name}: not a local folder, and loading it as a Hugging Face hub name failed "
      f"({cause}). It must be a local folder or a hub name; this machine may be offline (then "
      f"download the model elsewhere and pass its folder)")


def _decoding_kwargs(generation: dict[str, Any]) -> dict[str, Any]:
  """generate() keyword arguments; sampling parameters only when sampling (else HF warns)."""
  kw = dict(max_new_tokens=int(generation["max_new_tokens"]), do_sample=bool(generation["do_sample"]),
            num_beams=int(generation["num_beams"]),
            repetition_penalty=float(generation["repetition_penalty"]))
  if kw["do_sample"]:
    kw.update(temperature=float(generation["temperature"]), top_p=float(generation["top_p"]))
  else:
    kw.update(temperature=None, top_p=None, top_k=None)
  return kw


def _clean(text: str) -> str:
  """Generated text on one line: surrounding whitespace dropped, inner runs collapsed to a space."""
  return " ".join(text.split())


class VisionLanguageDescriber:
  """A LLaVA-family model that describes batches of PIL images, one prompt per image."""

  def __init__(self, name: str, device: torch.device, dtype: torch.dtype,
               generation: dict[str, Any]):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    self.device = device
    try:
      self.processor = AutoProcessor.from_pretrained(name)
      self.model = LlavaForConditionalGeneration.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise _load_error("--model", name, "a LLaVA model and processor", e) from e
    if getattr(self.processor, "chat_template", None) is None:
      raise DescribeError(f"--model={name}: its processor has no chat template "
                          f"(chat_template.json/.jinja), so the prompt format is unknown")
    tok = self.processor.tokenizer
    tok.padding_side = "left"   # batched decoder-only generation continues after the prompt
    if tok.pad_token is None:
      tok.pad_token = tok.eos_token
    self.model.to(device).eval()
    self._kwargs = _decoding_kwargs(generation)
    self._kwargs["pad_token_id"] = tok.pad_token_id

  def chat_prompt(self, prompt: str) -> str:
    """The model's chat format around one image and the instruction `prompt`."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

  @torch.inference_mode()
  def describe(self, images: Sequence[Any], chat_prompts: Sequence[str]) -> list[str]:
    """One description per image; chat_prompts[i] is the formatted prompt of images[i]."""
    inputs = self.processor(images=list(images), text=list(chat_prompts), padding=True,
                            return_tensors="pt")
    inputs = inputs.to(self.device)
    if "pixel_values" in inputs:
      inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
    out = self.model.generate(**inputs, **self._kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [_clean(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]


class Rewriter:
  """A text-only instruction model that rewrites descriptions through a prompt template."""

  def __init__(self, name: str, device: torch.device, dtype: torch.dtype,
               generation: dict[str, Any], use_chat_template: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    self.device = device
    try:
      self.tokenizer = AutoTokenizer.from_pretrained(name)
      self.model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise _load_error("--rewrite_model", name, "a causal language model and tokenizer", e) from e
    if use_chat_template and getattr(self.tokenizer, "chat_template", None) is None:
      raise DescribeError(
          f"--rewrite_model={name}: its tokenizer has no chat template; use an instruction model "
          f"with one, or pass --config.rewrite.use_chat_template=False to feed the prompt as is")
    self.use_chat_template = use_chat_template
    self.tokenizer.padding_side = "left"
    if self.tokenizer.pad_token is None:
      self.tokenizer.pad_token = self.tokenizer.eos_token
    self.model.to(device).eval()
    self._kwargs = _decoding_kwargs(generation)
    self._kwargs["pad_token_id"] = self.tokenizer.pad_token_id

  def format(self, message: str) -> str:
    """The text fed to the model for one filled-in rewrite prompt."""
    if not self.use_chat_template:
      return message
    return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                              add_generation_prompt=True)

  @torch.inference_mode()
  def rewrite(self, messages: Sequence[str]) -> list[str]:
    """One rewrite per filled-in prompt."""
    texts = [self.format(m) for m in messages]
    bos = self.tokenizer.bos_token
    # A chat template that writes the start token itself must not get a second one.
    add_special = not (bos and texts and texts[0].startswith(bos))
    inputs = self.tokenizer(texts, padding=True, return_tensors="pt",
                            add_special_tokens=add_special).to(self.device)
    out = self.model.generate(**inputs, **self._kwargs)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [_clean(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def seed_everything(seed: int) -> None:
  """Sampling runs draw from torch's generators; greedy decoding does not depend on this."""
  torch.manual_seed(seed)
