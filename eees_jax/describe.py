r"""Descriptions of every training image by a vision-language model (SPEC section 4).

  python -m eees_jax.describe --dataset=sysu --root=data/SYSU-MM01 \
      --out=data/SYSU-MM01/descriptions.jsonl --model=llava-hf/llava-1.5-7b-hf \
      [--config=configs/describe.py] [--batch_size=16] [--limit=100] [--splits=train,test] \
      [--rewrite_model=PATH] [--device=cuda]

Stage 1 describes each image with a LLaVA-family model, with the visible or the infrared prompt.
Stage 2 (with --rewrite_model) rewrites each description into one CLIP-sized sentence. The output
is a JSONL file, one record per image (format: SPEC section 4 / data_pipelines.descriptions).
Runs are resumable: records are flushed to disk batch by batch, a rerun skips described images,
and the file is rewritten sorted at the end. See docs/describe.md.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from PIL import Image

from data_pipelines import registry
from data_pipelines.records import DatasetError, ImageRecord, MODALITY_NAMES
from eees_jax.describe_lib import quality
from eees_jax.describe_lib.errors import DescribeError
from eees_jax.describe_lib.output import DescriptionLog

DATASETS = registry.names()
SPLITS = ("train", "test")
# Keys of a record's "generation" left out of the resume check: "dtype" (a run continued on another
# GPU or in another precision keeps its file) and "rewrite" (the rewrite settings, checked apart).
_INFORMATIONAL = ("dtype", "rewrite")


# ------------------------------------------------------------------------------------------------
# Which images: the union of the records the data set's readers return.


def image_records(dataset: str, root: str, splits: Sequence[str], config: Any) -> list[ImageRecord]:
  """Every image to describe, once, sorted by path (the output order)."""
  if dataset not in DATASETS:
    raise DatasetError(f"--dataset={dataset!r} is not one of {', '.join(DATASETS)}")
  bad = [s for s in splits if s not in SPLITS]
  if bad or not splits:
    raise DescribeError(f"--splits={','.join(splits)}: each split must be one of {', '.join(SPLITS)}")
  if not root or not os.path.isdir(root):
    raise DatasetError(f"--root={root!r} is not a folder (the unpacked {dataset} data set)")
  by_path: dict[str, ImageRecord] = {}
  for split in splits:
    # The data set's own readers (RegDB: the union over config.regdb_splits, one file for all).
    for rec in registry.get(dataset).describe_records(root, split, config):
      seen = by_path.setdefault(rec.path, rec)
      if seen.modality != rec.modality:
        raise DatasetError(f"{rec.path}: the {dataset} readers call it both visible and infrared")
  return [by_path[p] for p in sorted(by_path)]


def load_image(root: str, path: str) -> Image.Image:
  """An RGB PIL image (infrared images are 3-channel in every VI-ReID set; the VLM wants RGB)."""
  full = os.path.join(root, path)
  try:
    with Image.open(full) as im:
      return im.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DescribeError(f"cannot read image {full}: {type(e).__name__}: {e}; fix or remove the file "
                        f"(it is listed by the data set's index files), then rerun to continue") from e


def _prefetched(root: str, batches: Sequence[Sequence[ImageRecord]]
                ) -> Iterator[tuple[Sequence[ImageRecord], list[Image.Image]]]:
  """Batches with their images, the next batch decoded on a thread while the model generates."""
  if not batches:
    return
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    load = lambda b: [load_image(root, r.path) for r in b]
    future = pool.submit(load, batches[0])
    for i, batch in enumerate(batches):
      images = future.result()
      if i + 1 < len(batches):
        future = pool.submit(load, batches[i + 1])
      yield batch, images


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
  return [items[i:i + size] for i in range(0, len(items), size)]


# ------------------------------------------------------------------------------------------------
# Resuming: the records already in the file must come from the same settings.


def _decoding(generation: dict) -> dict:
  return {k: v for k, v in generation.items() if k not in _INFORMATIONAL}


def _check_resumable(log: DescriptionLog, model: str, prompts: dict, generation: dict,
                     rewrite: dict | None, any_pending: bool) -> None:
  """Refuses to mix records of different models, prompts or decoding settings in one file."""
  for image, rec in sorted(log.records.items()):
    ours = dict(model=model, prompt=prompts[rec["modality"]], generation=_decoding(generation))
    theirs = dict(model=rec["model"], prompt=rec["prompt"], generation=_decoding(rec["generation"]))
    if ours != theirs:
      diff = [k for k in ours if ours[k] != theirs[k]]
      raise DescribeError(
          f"{log.path}: {image} was described with " + "; ".join(f"{k}={theirs[k]!r}" for k in diff)
          + ", this run uses " + "; ".join(f"{k}={ours[k]!r}" for k in diff)
          + ". Resume with the same --model and config, or write to another --out")
    if rec["rewritten"] is None:
      continue
    if rewrite is None:
      if any_pending:
        raise DescribeError(
            f"{log.path}: its records carry rewrites by {rec['rewrite_model']!r}; pass "
            f"--rewrite_model={rec['rewrite_model']} so the new records get them too")
      continue
    ours = dict(rewrite_model=rewrite["model"], rewrite_prompt=rewrite["prompt"],
                rewrite_generation=_decoding(rewrite["generation"]))
    theirs = dict(rewrite_model=rec["rewrite_model"], rewrite_prompt=rec["rewrite_prompt"],
                  rewrite_generation=_decoding(rec["generation"].get("rewrite", {})))
    if ours != theirs:
      diff = [k for k in ours if ours[k] != theirs[k]]
      raise DescribeError(
          f"{log.path}: {image} was rewritten with " + "; ".join(f"{k}={theirs[k]!r}" for k in diff)
          + ", this run uses " + "; ".join(f"{k}={ours[k]!r}" for k in diff)
          + ". Resume with the same --rewrite_model and config, or write to another --out")


# ------------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Summary:
  """Counts over the images of this run (after it), printed at the end."""
  images: int = 0
  described_before: int = 0
  newly_described: int = 0
  newly_rewritten: int = 0
  exceeds_77_tokens: int = 0
  empty: int = 0
  repeats_prompt: int = 0
  out: str = ""
  max_tokens: int = 77
  counted_with: str = ""

  def text(self) -> str:
    rows = [("images", self.images), ("already described", self.described_before),
            ("newly described", self.newly_described), ("newly rewritten", self.newly_rewritten),
            (f"over {self.max_tokens} CLIP tokens", f"{self.exceeds_77_tokens}  ({self.counted_with})"),
            ("empty", self.empty), ("repeat the prompt", self.repeats_prompt)]
    return "\n".join([f"descriptions: {self.out}"] + [f"  {k + ':':<22} {v}" for k, v in rows]
                      + ['  (flagged records are kept; see their "flags")'])


def token_counter(path: str) -> tuple[Any, str]:
  """(count function, its name) for the 77-token flag: the trainer's own CLIP tokenizer."""
  from eees_jax.models.tokenizer import Tokenizer
  tok = Tokenizer.load(path or None)
  name = f"CLIP tokenizer of {path}" if path else "CLIP BPE vocabulary of clip-anytorch"
  return (lambda text: int(tok.count_tokens([text])[0])), name


def run(config: Any, *, dataset: str, root: str, out: str, model: str,
        rewrite_model: str | None = None, device: str | None = None, limit: int | None = None,
        splits: Sequence[str] = ("train",), progress: bool = True) -> Summary:
  """Describes (and optionally rewrites) every image of `dataset` not yet in `out`; see module doc."""
  if dataset not in DATASETS:
    raise DatasetError(f"--dataset={dataset!r} is not one of {', '.join(DATASETS)}")
  if limit is not None and limit <= 0:
    raise DescribeError(f"--limit={limit} must be positive")
  if config.batch_size <= 0 or config.rewrite.batch_size <= 0:
    raise DescribeError("config.batch_size and config.rewrite.batch_size must be positive")
  from eees_jax.describe_lib import models   # torch is imported by this command only
  model_id = models.model_source(model, "--model")   # fail fast, before scanning the data set
  rewrite_id = models.model_source(rewrite_model, "--rewrite_model") if rewrite_model else None
  records = image_records(dataset, root, splits, config)[:limit]
  dev = models.resolve_device(device)
  dtype = models.resolve_dtype(config.dtype, dev)
  prompts = {name: config.prompts[name] for name in ("visible", "infrared")}
  generation = dict(config.generation.to_dict(), seed=int(config.seed),
                    dtype=models.dtype_name(dtype))
  rewrite = None
  if rewrite_id:
    rewrite = dict(model=rewrite_id, prompt=config.rewrite.prompt,
                   generation=dict(config.rewrite.generation.to_dict(),
                                   use_chat_template=bool(config.rewrite.use_chat_template),
                                   dtype=models.dtype_name(dtype)))
    if "{description}" not in rewrite["prompt"]:
      raise DescribeError("config.rewrite.prompt must contain {description}, where the text goes")
  count_tokens, counter_name = token_counter(config.clip_tokenizer)

  def flags_of(rec: dict) -> list[str]:
    prompt = prompts[rec["modality"]]
    return quality.flags_for(rec["description"], prompt, rec["rewritten"], rec["rewrite_prompt"],
                             count_tokens, config.max_clip_tokens, config.echo_window)

  log = DescriptionLog(out)
  summary = Summary(images=len(records), out=out, max_tokens=config.max_clip_tokens,
                    counted_with=counter_name)
  try:
    pending = [r for r in records if r.path not in log.records]
    summary.described_before = len(records) - len(pending)
    _check_resumable(log, model_id, prompts, generation, rewrite, bool(pending))
    missing = [r.path for r in pending if not os.path.isfile(os.path.join(root, r.path))]
    if missing:
      raise DescribeError(f"{len(missing)} image(s) listed by the {dataset} readers are missing under "
                          f"{root}, e.g. {os.path.join(root, missing[0])}")
    models.seed_everything(int(config.seed))

    if pending:
      # One modality per batch: equal prompts, so (almost) no padding inside a batch.
      order = sorted(pending, key=lambda r: (r.modality, r.path))
      vlm = models.VisionLanguageDescriber(model_id, dev, dtype, generation)
      chat = {name: vlm.chat_prompt(p) for name, p in prompts.items()}
      batches = [b for m in sorted(MODALITY_NAMES) for b in
                 _batches([r for r in order if r.modality == m], config.batch_size)]
      logging.info("describing %d images with %s on %s (%s), batch %d", len(pending), model_id, dev,
                   generation["dtype"], config.batch_size)
      with _progress(len(pending), "describe", "img", progress) as bar, \
          contextlib.closing(_prefetched(root, batches)) as loaded:
        for batch, images in loaded:
          names = [MODALITY_NAMES[r.modality] for r in batch]
          texts = vlm.describe(images, [chat[n] for n in names])
          new = []
          for r, name, text in zip(batch, names, texts):
            rec = dict(image=r.path, modality=name, description=text, rewritten=None, model=model_id,
                       prompt=prompts[name], rewrite_model=None, rewrite_prompt=None,
                       generation=dict(generation), flags=[])
            rec["flags"] = flags_of(rec)
            new.append(rec)
          log.append(new)
          summary.newly_described += len(new)
          bar.update(len(new))
      del vlm
      _free_accelerator_memory()

    if rewrite is not None:
      todo = [log.records[r.path] for r in records if log.records[r.path]["rewritten"] is None]
      if todo:
        rw = models.Rewriter(rewrite_id, dev, dtype, rewrite["generation"],
                             bool(config.rewrite.use_chat_template))
        logging.info("rewriting %d descriptions with %s", len(todo), rewrite_id)
        with _progress(len(todo), "rewrite", "text", progress) as bar:
          for batch in _batches(todo, config.rewrite.batch_size):
            texts = rw.rewrite([rewrite["prompt"].replace("{description}", r["description"])
                                for r in batch])
            new = []
            for r, text in zip(batch, texts):
              rec = dict(r, rewritten=text, rewrite_model=rewrite_id, rewrite_prompt=rewrite["prompt"],
                         generation=dict(r["generation"], rewrite=dict(rewrite["generation"])))
              rec["flags"] = flags_of(rec)
              new.append(rec)
            log.append(new)
            summary.newly_rewritten += len(new)
            bar.update(len(new))
        del rw
        _free_accelerator_memory()

    log.compact()
  finally:
    log.close()

  for r in records:
    fl = log.records[r.path]["flags"]
    summary.exceeds_77_tokens += quality.EXCEEDS in fl
    summary.empty += quality.EMPTY in fl
    summary.repeats_prompt += quality.REPEATS_PROMPT in fl
  return summary


def _progress(total: int, desc: str, unit: str, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
              smoothing=0.1)


def _free_accelerator_memory() -> None:
  """Stage 2 may need the GPU memory stage 1 held."""
  import gc
  import torch
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Command line.

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "describe.py")


def define_flags() -> dict[str, Any]:
  """The command's flags; defined only when it runs, so importing this module defines none."""
  return dict(
      config=config_flags.DEFINE_config_file(
          "config", _DEFAULT_CONFIG, "prompts and generation settings (configs/describe.py)"),
      dataset=flags.DEFINE_enum("dataset", None, DATASETS, "which data set's images to describe"),
      root=flags.DEFINE_string("root", None, "the unpacked data set folder"),
      out=flags.DEFINE_string("out", None, "descriptions JSONL to write or continue"),
      model=flags.DEFINE_string("model", None, "LLaVA-family model: local folder or hub name"),
      rewrite_model=flags.DEFINE_string(
          "rewrite_model", None, "optional text instruction model (folder or hub name), stage 2"),
      batch_size=flags.DEFINE_integer("batch_size", None,
                                      "images per batch (default: config.batch_size)"),
      limit=flags.DEFINE_integer("limit", None, "describe only the first N images (sorted by path)"),
      device=flags.DEFINE_string("device", None, "cpu | cuda | cuda:N (default: cuda if available)"),
      splits=flags.DEFINE_list("splits", ["train"], "train and/or test images"),
      progress=flags.DEFINE_bool("progress", True, "show a progress bar"),
  )


def main(argv: Sequence[str], holders: dict[str, Any]) -> None:
  """Runs the command from parsed flags; errors in the input end it with one clear line."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("dataset", "root", "out", "model"):
    if holders[name].value is None:
      raise app.UsageError(f"--{name} is required")
  v = {name: h.value for name, h in holders.items()}
  config = v["config"]
  if v["batch_size"] is not None:
    config.batch_size = v["batch_size"]
  start = time.time()
  try:
    summary = run(config, dataset=v["dataset"], root=v["root"], out=v["out"], model=v["model"],
                  rewrite_model=v["rewrite_model"], device=v["device"], limit=v["limit"],
                  splits=v["splits"], progress=v["progress"])
  except (DescribeError, DatasetError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(summary.text())
  print(f"  ({time.time() - start:.0f} s)")


if __name__ == "__main__":
  _holders = define_flags()
  app.run(lambda argv: main(argv, _holders))
