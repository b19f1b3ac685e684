"""Search a folder of person images by image (either modality), by sentence, or by both.

  python -m eees_jax.search index --workdir W --images DIR --out INDEX \\
      [--modality visible|infrared|sysu] [--step latest|best|N] [--overwrite]
  python -m eees_jax.search query --index INDEX --image q.jpg --modality infrared [-k 20] \\
      [--gallery-modality visible|infrared|all] [--picture ranked.png]
  python -m eees_jax.search query --index INDEX --text "a woman with long hair in a dark skirt"
  python -m eees_jax.search query --index INDEX --image ir.jpg --modality infrared \\
      --text "carrying a red backpack" --gallery-modality visible          # fusion

An index folder holds, for every image under DIR (sorted by path):
  features.npy   float32 [n, feature_dim]  the test-time feature (SPEC section 1): image search
  joint.npy      float32 [n, joint_dim]    l2(v), the image in CLIP's joint space: text search
  images.jsonl   one line per row: {"path": relative to DIR, "modality", "camera": int | null}
  index.json     the model that made it (inference's model_id, workdir, step, feature layout and
                 dimensions, input size), the image folder, the count
It is written into a staging folder beside INDEX and renamed into place, so a crash never leaves a
half-written index. A query loads the model the index names (or --workdir / --step) and refuses a
model whose id or feature layout differs: features of two models are not comparable.

Scores are cosine similarities, ranked by exact search (eees_jax.exact_search: chunked, jitted on
the default device). What each query compares:
  image            its test-time feature against the gallery's test-time features;
  text             the text feature (embed_text) against the gallery's l2(v);
  image + text     the fusion l2((1 - w) l2(v_image) + w l2(t)) (embedding.fuse_joint, w =
                   --text-weight, default 0.5: the normalised sum) against the gallery's l2(v).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from data_pipelines.records import MODALITY_NAMES
from eees_jax import embedding, exact_search, staging

if TYPE_CHECKING:
  from eees_jax.inference import Embedder

FORMAT = "eees-jax-index"
VERSION = 1
META, FEATURES, JOINT, IMAGES = "index.json", "features.npy", "joint.npy", "images.jsonl"
# What a row of features.npy is; a model whose feature means something else cannot use the index.
FEATURE_LAYOUT = "concat(l2(BN f), l2(v)) of the image [and of its mirror when flip]"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MODALITY_RULES = ("visible", "infrared", "sysu")
GALLERY_MODALITIES = ("all", "visible", "infrared")
SYSU_CAMERAS = {f"cam{c}": c for c in range(1, 7)}
SYSU_INFRARED = (3, 6)
_EMBED_BLOCK = 1024     # images per embedding call while indexing (the progress bar's step)
_MODALITY_CODE = {name: code for code, name in MODALITY_NAMES.items()}


class SearchError(ValueError):
  """A search input that cannot be used (empty folder, bad index, mismatched model, bad option)."""


# ----------------------------------------------------------------------------------------------
# Images of a folder.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
  """One indexed image: path relative to the image folder, modality name, SYSU camera or None."""
  path: str
  modality: str
  camera: int | None = None

  def to_json(self) -> dict:
    return {"path": self.path, "modality": self.modality, "camera": self.camera}


def list_images(folder: str, rule: str) -> list[Entry]:
  """Every image file under `folder` (sorted by relative path, '/'-separated).

  rule: "visible" / "infrared" (every image has that modality), or "sysu": the modality comes from
  the SYSU-MM01 camera folder on the path (cam1, 2, 4, 5 visible; cam3, 6 infrared).
  """
  if rule not in MODALITY_RULES:
    raise SearchError(f"--modality {rule!r}: expected one of {', '.join(MODALITY_RULES)}")
  if not os.path.isdir(folder):
    raise SearchError(f"image folder {folder} does not exist or is not a folder")
  paths = []
  for parent, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
        paths.append(os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/"))
  paths.sort()
  if not paths:
    raise SearchError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  if rule != "sysu":
    return [Entry(p, rule) for p in paths]
  entries, outside = [], []
  for p in paths:
    cams = [SYSU_CAMERAS[part] for part in p.split("/")[:-1] if part in SYSU_CAMERAS]
    if not cams:
      outside.append(p)
      continue
    cam = cams[-1]
    entries.append(Entry(p, "infrared" if cam in SYSU_INFRARED else "visible", cam))
  if outside:
    raise SearchError(f"--modality sysu: {len(outside)} image(s) under {folder} are in no SYSU-MM01 "
                      f"camera folder cam1..cam6 (first: {outside[0]}); move them, or index them "
                      "with --modality visible or infrared")
  return entries


# ----------------------------------------------------------------------------------------------
# The index folder.
# ----------------------------------------------------------------------------------------------

def model_identity(model: Embedder) -> dict:
  """What an index records about the model that made it."""
  return {"model_id": model.model_id, "workdir": os.path.abspath(model.workdir),
          "step": int(model.step), "feature_layout": FEATURE_LAYOUT, "flip": bool(model.flip),
          "feature_dim": int(model.feature_dim), "joint_dim": int(model.joint_dim),
          "height": int(model.height), "width": int(model.width),
          "modalities": list(model.modalities)}


def _check_out(out: str, overwrite: bool) -> None:
  if not os.path.exists(out):
    return
  if not os.path.isdir(out) or os.listdir(out) and not os.path.isfile(os.path.join(out, META)):
    raise SearchError(f"--out {out} exists and is not an index folder; choose another path")
  if os.listdir(out) and not overwrite:
    raise SearchError(f"--out {out} already holds an index; pass --overwrite to replace it")


def build_index(model: Embedder, images: str, out: str, rule: str = "sysu",
                overwrite: bool = False, progress: bool = True) -> dict:
  """Embeds every image under `images` with `model` and writes the index folder `out`; returns
  its metadata (index.json)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  images, out = os.path.abspath(images), os.path.abspath(out)
  entries = list_images(images, rule)
  _check_out(out, overwrite)
  modality_of = {m: c for c, m in MODALITY_NAMES.items()}
  lacking = sorted({e.modality for e in entries} - set(model.modalities))
  if lacking:
    raise SearchError(f"the folder holds {' and '.join(lacking)} images (--modality {rule}); the "
                      f"model of {model.workdir} has stems for {' and '.join(model.modalities)} "
                      "images only")
  start = time.perf_counter()
  with staging.staged_folder(out) as folder:
    n = len(entries)
    feats = np.lib.format.open_memmap(os.path.join(folder, FEATURES), "w+", np.float32,
                                      (n, model.feature_dim))
    joint = np.lib.format.open_memmap(os.path.join(folder, JOINT), "w+", np.float32,
                                      (n, model.joint_dim))
    with tqdm(total=n, desc="indexing", unit="img", disable=not progress) as bar:
      for lo in range(0, n, _EMBED_BLOCK):
        block = entries[lo:lo + _EMBED_BLOCK]
        f = model.embed_images([os.path.join(images, e.path) for e in block],
                               [modality_of[e.modality] for e in block])
        feats[lo:lo + len(block)] = f
        joint[lo:lo + len(block)] = model.joint_of(f)
        bar.update(len(block))
    feats.flush()
    joint.flush()
    del feats, joint
    with open(os.path.join(folder, IMAGES), "w", encoding="utf-8") as fh:
      for e in entries:
        fh.write(json.dumps(e.to_json()) + "\n")
    meta = {"format": FORMAT, "version": VERSION, "model": model_identity(model),
            "images": images, "modality_rule": rule, "count": n,
            "modalities": {m: sum(e.modality == m for e in entries) for m in MODALITY_NAMES.values()},
            "seconds": round(time.perf_counter() - start, 2)}
    with open(os.path.join(folder, META), "w") as fh:
      json.dump(meta, fh, indent=1)
      fh.write("\n")
  return meta


@dataclasses.dataclass
class Index:
  """An index folder read back: meta (index.json), entries, features and joint features."""
  path: str
  meta: dict
  entries: list[Entry]
  features: np.ndarray
  joint: np.ndarray

  @property
  def images(self) -> str:
    return self.meta["images"]

  @property
  def model(self) -> dict:
    return self.meta["model"]


def read_index(path: str) -> Index:
  """Reads and checks an index folder (SearchError naming what is wrong)."""
  meta_path = os.path.join(path, META)
  if not os.path.isfile(meta_path):
    raise SearchError(f"{path} is not an index folder (no {META}); build one with "
                      "`python -m eees_jax.search index --workdir W --images DIR --out INDEX`")
  try:
    with open(meta_path) as fh:
      meta = json.load(fh)
  except (OSError, json.JSONDecodeError) as e:
    raise SearchError(f"{meta_path} is unreadable ({e}); rebuild the index") from None
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise SearchError(f"{path} is an index of format {meta.get('format')!r} version "
                      f"{meta.get('version')!r}; this code reads {FORMAT!r} version {VERSION}: "
                      "rebuild it")
  model = meta["model"]
  if model.get("feature_layout") != FEATURE_LAYOUT:
    raise SearchError(f"{path} holds features of layout {model.get('feature_layout')!r}; this code "
                      f"searches {FEATURE_LAYOUT!r}: rebuild the index")
  try:
    entries = []
    with open(os.path.join(path, IMAGES), encoding="utf-8") as fh:
      for line in fh:
        if line.strip():
          d = json.loads(line)
          entries.append(Entry(d["path"], d["modality"], d.get("camera")))
    features = np.load(os.path.join(path, FEATURES), mmap_mode="r")
    joint = np.load(os.path.join(path, JOINT), mmap_mode="r")
  except (OSError, ValueError, KeyError) as e:
    raise SearchError(f"index {path} is damaged ({type(e).__name__}: {e}); rebuild it") from None
  n = meta["count"]
  if (len(entries) != n or features.shape != (n, model["feature_dim"])
      or joint.shape != (n, model["joint_dim"])):
    raise SearchError(f"index {path} is damaged: {len(entries)} entries, features {features.shape}, "
                      f"joint {joint.shape} for count {n}; rebuild it")
  return Index(path=os.path.abspath(path), meta=meta, entries=entries, features=features,
               joint=joint)


def check_model(index: Index, model: Embedder) -> None:
  """Refuses a model whose features are not the index's (another layout, another model)."""
  want, have = index.model, model_identity(model)
  layout = ("feature_layout", "flip", "feature_dim", "joint_dim")
  differ = [f"{k} {want.get(k)!r} in the index, {have[k]!r} for the model" for k in layout
            if want.get(k) != have[k]]
  if differ:
    raise SearchError(f"index {index.path} holds another feature layout than the model of "
                      f"{model.workdir} step {model.step} ({'; '.join(differ)}); rebuild the index "
                      "with this model")
  if want["model_id"] != have["model_id"]:
    raise SearchError(f"index {index.path} was built by model {want['model_id']} ({want['workdir']} "
                      f"step {want['step']}); the model loaded is {have['model_id']} "
                      f"({have['workdir']} step {have['step']}); its features are not comparable: "
                      "query with the index's model, or rebuild the index with this one")


def load_model(index: Index, workdir: str | None = None, step: str | int | None = None) -> Embedder:
  """The model an index names (or `workdir` / `step` instead), checked against the index."""
  from eees_jax import inference  # pylint: disable=g-import-not-at-top (jax models: only here)
  workdir = workdir or index.model["workdir"]
  if step is None:
    same = os.path.abspath(workdir) == index.model["workdir"]
    step = index.model["step"] if same else "latest"
  try:
    model = inference.load(workdir, step)
  except inference.WorkdirError as e:
    raise SearchError(f"cannot load the model for index {index.path}: {e} (--workdir / --step "
                      "load it from elsewhere)") from None
  check_model(index, model)
  return model


# ----------------------------------------------------------------------------------------------
# Queries.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hit:
  rank: int
  index: int
  score: float
  entry: Entry


class Searcher:
  """An index on the device with its model: image, text and fused queries."""

  def __init__(self, index: Index, model: Embedder, chunk_size: int = exact_search.DEFAULT_CHUNK):
    check_model(index, model)
    self.index, self.model = index, model
    groups = np.asarray([_MODALITY_CODE[e.modality] for e in index.entries], np.int32)
    ng = len(MODALITY_NAMES)
    self._features = exact_search.Gallery(np.asarray(index.features), groups, num_groups=ng,
                                          chunk_size=chunk_size)
    self._joint = exact_search.Gallery(np.asarray(index.joint), groups, num_groups=ng,
                                       chunk_size=chunk_size)

  @staticmethod
  def _groups(gallery_modality: str) -> list[int] | None:
    if gallery_modality not in GALLERY_MODALITIES:
      raise SearchError(f"gallery modality {gallery_modality!r}: expected one of "
                        f"{', '.join(GALLERY_MODALITIES)}")
    return None if gallery_modality == "all" else [_MODALITY_CODE[gallery_modality]]

  def _check_modality(self, modality: str) -> None:
    if modality not in _MODALITY_CODE:
      raise SearchError(f"query modality {modality!r}: expected visible or infrared")
    if modality not in self.model.modalities:
      raise SearchError(f"the model of {self.model.workdir} has stems for "
                        f"{' and '.join(self.model.modalities)} images only, not {modality}")

  def _hits(self, gallery: exact_search.Gallery, query: np.ndarray, k: int, gallery_modality: str,
            exclude: int | None = None) -> list[Hit]:
    groups = self._groups(gallery_modality)
    if gallery.count(groups) == 0:
      raise SearchError(f"the index holds no {gallery_modality} images")
    extra = 1 if exclude is not None else 0
    scores, idx = gallery.search(query[None], k + extra, groups)
    pairs = [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if i != exclude][:k]
    return [Hit(rank, i, s, self.index.entries[i]) for rank, (i, s) in enumerate(pairs, 1)]

  def read_query_image(self, image: str | np.ndarray) -> np.ndarray:
    """A query image as uint8 RGB [h, w, 3] (DatasetError naming a missing / unreadable file)."""
    if isinstance(image, np.ndarray):
      return image
    from data_pipelines.images import read_image  # pylint: disable=g-import-not-at-top
    return read_image(image)

  def image_feature(self, image: str | np.ndarray, modality: str) -> np.ndarray:
    self._check_modality(modality)
    return self.model.embed_images([self.read_query_image(image)], modality)[0]

  def by_image(self, image: str | np.ndarray, modality: str, k: int = 20,
               gallery_modality: str = "all") -> list[Hit]:
    """Image query: test-time features, cosine."""
    return self._hits(self._features, self.image_feature(image, modality), k, gallery_modality)

  def by_text(self, text: str, k: int = 20, gallery_modality: str = "all") -> list[Hit]:
    """Sentence query: the text feature against the gallery's l2(v)."""
    return self._hits(self._joint, self.text_feature(text), k, gallery_modality)

  def text_feature(self, text: str) -> np.ndarray:
    if not text or not text.strip():
      raise SearchError("the query sentence is empty")
    return self.model.embed_text([text])[0]

  def by_image_and_text(self, image: str | np.ndarray, modality: str, text: str, k: int = 20,
                        gallery_modality: str = "all", text_weight: float = 0.5) -> list[Hit]:
    """Fused query: embedding.fuse_joint(l2(v) of the image, the text feature, text_weight)."""
    self._check_modality(modality)
    v = self.model.joint_of(self.model.embed_images([self.read_query_image(image)], modality))
    q = embedding.fuse_joint(v, self.text_feature(text)[None], text_weight)[0]
    return self._hits(self._joint, q, k, gallery_modality)

  def by_entry(self, i: int, k: int = 20, gallery_modality: str = "all") -> list[Hit]:
    """Query with indexed image i (its stored test-time feature); i itself is left out."""
    if not 0 <= i < len(self.index.entries):
      raise SearchError(f"no image {i} in the index ({len(self.index.entries)} images)")
    return self._hits(self._features, np.asarray(self.index.features[i]), k, gallery_modality,
                      exclude=i)


# ----------------------------------------------------------------------------------------------
# The ranked-list picture.
# ----------------------------------------------------------------------------------------------

_CELL = (96, 192)            # thumbnail width, height
_CAPTION = 30
_PER_ROW = 10
_INK, _FRAME, _QUERY = (20, 20, 20), (200, 200, 200), (40, 80, 230)
_MODALITY_COLOUR = {"visible": (0, 140, 60), "infrared": (170, 40, 40)}


def entry_label(entry: Entry) -> str:
  """'visible cam1', 'infrared' (no camera known)."""
  cam = f" cam{entry.camera}" if entry.camera is not None else ""
  return f"{entry.modality}{cam}"


def ranked_picture(hits: Sequence[Hit], images_root: str, path: str,
                   query_image: np.ndarray | None = None, query_modality: str | None = None,
                   query_text: str | None = None) -> None:
  """PNG at `path`: the query (image and/or sentence) then the hits, 10 per row, each captioned
  with rank, score, modality and camera."""
  from PIL import Image, ImageDraw, ImageFont, ImageOps  # pylint: disable=g-import-not-at-top
  w, h = _CELL
  font = ImageFont.load_default()
  rows = max(1, -(-len(hits) // _PER_ROW))
  left = w + 24
  sheet = Image.new("RGB", (left + _PER_ROW * (w + 4), rows * (h + _CAPTION + 6) + 4), "white")
  draw = ImageDraw.Draw(sheet)
  y_text = 2
  if query_image is not None:
    im = ImageOps.pad(Image.fromarray(query_image).convert("RGB"), (w - 6, h - 6), color="white")
    sheet.paste(ImageOps.expand(im, border=3, fill=_QUERY), (2, 2))
    draw.text((4, h + 4), f"query: {query_modality}", fill=_QUERY, font=font)
    y_text = h + 18
  if query_text:
    lines = textwrap.wrap(query_text, 15)[:12]
    draw.text((4, y_text), "query text:" if query_image is not None else "query:", fill=_QUERY,
              font=font)
    for j, line in enumerate(lines):
      draw.text((4, y_text + 12 * (j + 1)), line, fill=_INK, font=font)
  for n, hit in enumerate(hits):
    x = left + (n % _PER_ROW) * (w + 4)
    y = 2 + (n // _PER_ROW) * (h + _CAPTION + 6)
    try:
      with Image.open(os.path.join(images_root, hit.entry.path)) as im:
        im = ImageOps.pad(im.convert("RGB"), (w - 4, h - 4), color="white")
    except OSError:
      im = Image.new("RGB", (w - 4, h - 4), (235, 235, 235))
    colour = _MODALITY_COLOUR.get(hit.entry.modality, _FRAME)
    sheet.paste(ImageOps.expand(im, border=2, fill=colour), (x, y))
    draw.text((x + 2, y + h + 2), f"{hit.rank}: {hit.score:.3f}", fill=_INK, font=font)
    draw.text((x + 2, y + h + 14), entry_label(hit.entry), fill=colour, font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sheet.save(path)


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------

def parse_step(value: str) -> str | int:
  """A --step value: 'latest', 'best' or a step number."""
  return int(value) if value.isdigit() else value


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m eees_jax.search",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  idx = sub.add_parser("index", help="embed every image under a folder into an index folder")
  idx.add_argument("--workdir", required=True, help="the trained model's workdir")
  idx.add_argument("--step", type=parse_step, default="latest", help="latest, best or a step number")
  idx.add_argument("--images", required=True, help="folder of images (searched recursively)")
  idx.add_argument("--out", required=True, help="index folder to write")
  idx.add_argument("--modality", default="sysu", choices=MODALITY_RULES,
                   help="modality of every image, or 'sysu': from the SYSU-MM01 camera folders "
                        "(cam3, cam6 infrared; cam1, 2, 4, 5 visible)")
  idx.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
  q = sub.add_parser("query", help="search an index by image, sentence, or both (fusion)")
  q.add_argument("--index", required=True, help="index folder")
  q.add_argument("--image", help="query image file")
  q.add_argument("--modality", choices=("visible", "infrared"), help="modality of --image")
  q.add_argument("--text", help="query sentence")
  q.add_argument("-k", type=int, default=20, help="results to show")
  q.add_argument("--gallery-modality", default="all", choices=GALLERY_MODALITIES,
                 help="search only the index's images of this modality")
  q.add_argument("--text-weight", type=float, default=0.5,
                 help="fusion (--image and --text): weight w of the text in "
                      "l2((1 - w) l2(v_image) + w l2(t))")
  q.add_argument("--picture", default="ranked_list.png", help="ranked-list PNG to write ('' none)")
  q.add_argument("--workdir", help="model workdir (default: the one the index records)")
  q.add_argument("--step", type=parse_step, default=None,
                 help="model step (default: the index's step for its workdir, else latest)")
  return parser


def _query(args) -> int:
  if not args.image and not args.text:
    raise SearchError("give --image (with --modality) and/or --text")
  if args.image and not args.modality:
    raise SearchError("--image needs --modality visible or infrared (which stem embeds it)")
  if args.k < 1:
    raise SearchError(f"-k must be at least 1, got {args.k}")
  if not 0.0 <= args.text_weight <= 1.0:
    raise SearchError(f"--text-weight must be in [0, 1], got {args.text_weight}")
  index = read_index(args.index)
  image = None
  if args.image:
    from data_pipelines.images import read_image  # pylint: disable=g-import-not-at-top
    image = read_image(args.image)  # fails before the model is loaded
  searcher = Searcher(index, load_model(index, args.workdir, args.step))
  if image is not None and args.text:
    hits = searcher.by_image_and_text(image, args.modality, args.text, args.k,
                                      args.gallery_modality, args.text_weight)
    what = (f"{args.modality} image {args.image} + text {args.text!r} "
            f"(text weight {args.text_weight})")
  elif image is not None:
    hits = searcher.by_image(image, args.modality, args.k, args.gallery_modality)
    what = f"{args.modality} image {args.image}"
  else:
    hits = searcher.by_text(args.text, args.k, args.gallery_modality)
    what = f"text {args.text!r}"
  print(f"{what} -> {args.gallery_modality} images of {index.path} (under {index.images}):")
  print(f"{'rank':>4}  {'score':>7}  {'modality':<8}  {'camera':>6}  path")
  for hit in hits:
    cam = "-" if hit.entry.camera is None else str(hit.entry.camera)
    print(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.entry.modality:<8}  {cam:>6}  {hit.entry.path}")
  if args.picture:
    ranked_picture(hits, index.images, args.picture, image, args.modality, args.text)
    print(f"ranked list written to {args.picture}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow decodes images: no info logs
  args = _parser().parse_args(argv)
  try:
    if args.command == "index":
      from eees_jax import inference  # pylint: disable=g-import-not-at-top
      model = inference.load(args.workdir, args.step)
      meta = build_index(model, args.images, args.out, args.modality, args.overwrite)
      counts = ", ".join(f"{n} {m}" for m, n in meta["modalities"].items())
      print(f"indexed {meta['count']} images ({counts}) of {meta['images']} into "
            f"{os.path.abspath(args.out)} in {meta['seconds']:.1f} s with model "
            f"{model.model_id} ({model.workdir} step {model.step})")
      return 0
    return _query(args)
  except (ValueError, OSError) as e:  # SearchError, DatasetError, WorkdirError, missing files
    message = " ".join(str(e).split())
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
