"""A local web page to search an index: upload an image (saying which modality it is) or type a
sentence, or both (fusion), and see the top results; clicking a result searches with it.

  python -m eees_jax.serve --index INDEX [--port 8000] [--host 127.0.0.1] [-k 20] \\
      [--workdir W --step N]

Flask renders everything server-side (no JavaScript needed); the model is the one the index names
(eees_jax.search.load_model), loaded once at start. Thumbnails come from the index's image folder
only: /image/<path> answers for the paths the index lists, and only when the file resolves inside
that folder (no `..`, no symbolic link out of it). The page listens on 127.0.0.1 by default; it is a
local tool with no authentication, so do not expose it with --host 0.0.0.0 on a shared network.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import sys
from typing import Sequence

import numpy as np

from eees_jax import search

MAX_UPLOAD_BYTES = 20 * 1024 * 1024

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>EEES person search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #1f3b63; color: white; padding: 12px 24px; }
  header h1 { margin: 0; font-size: 20px; }
  header p { margin: 4px 0 0; font-size: 13px; opacity: 0.85; }
  main { display: flex; gap: 24px; padding: 20px 24px; align-items: flex-start; }
  aside { width: 300px; flex: none; }
  form { background: white; border-radius: 8px; padding: 14px; margin-bottom: 16px;
         box-shadow: 0 1px 3px rgba(0,0,0,0.12); }
  form h2 { font-size: 15px; margin: 0 0 10px; }
  label { display: block; font-size: 13px; margin: 8px 0 3px; color: #444; }
  textarea, input[type=text], select, input[type=file] { width: 100%; box-sizing: border-box;
         font-size: 14px; }
  textarea { height: 64px; padding: 6px; }
  button { margin-top: 12px; background: #1f5fbf; color: white; border: 0; border-radius: 5px;
           padding: 7px 14px; font-size: 14px; cursor: pointer; }
  .row { display: flex; gap: 8px; } .row > div { flex: 1; }
  section { flex: 1; min-width: 0; }
  .query { background: white; border-radius: 8px; padding: 12px 14px; margin-bottom: 16px;
           display: flex; gap: 14px; align-items: center; box-shadow: 0 1px 3px rgba(0,0,0,0.12); }
  .query img { height: 128px; width: 64px; object-fit: contain; background: #eee; }
  .query .what { font-size: 14px; }
  .query .sentence { font-style: italic; margin-top: 4px; }
  .grid { display: flex; flex-wrap: wrap; gap: 12px; }
  .result { background: white; border-radius: 8px; width: 112px; padding: 8px; text-align: center;
            box-shadow: 0 1px 3px rgba(0,0,0,0.12); text-decoration: none; color: inherit; }
  .result:hover { outline: 2px solid #1f5fbf; }
  .result img { width: 96px; height: 192px; object-fit: contain; background: #eee;
                image-rendering: pixelated; }
  .rank { font-weight: 600; font-size: 13px; }
  .score { font-size: 13px; color: #333; }
  .badge { display: inline-block; font-size: 11px; border-radius: 3px; padding: 1px 5px;
           color: white; margin-top: 3px; }
  .visible { background: #1c8a4c; } .infrared { background: #b3372f; }
  .path { font-size: 10px; color: #777; word-break: break-all; margin-top: 3px; }
  .error { background: #fde8e7; color: #8a1c14; border: 1px solid #f3b7b2; border-radius: 6px;
           padding: 10px 14px; margin-bottom: 16px; }
  .hint { color: #666; font-size: 14px; }
</style>
</head>
<body>
{% macro gallery_and_k(prefix) %}
    <div class="row">
      <div><label for="{{ prefix }}-gallery">Search among</label>
        <select id="{{ prefix }}-gallery" name="gallery">
          {% for m in gallery_modalities %}
          <option value="{{ m }}"{% if m == gallery %} selected{% endif %}>{{ 'all' if m == 'all' else m }} images</option>
          {% endfor %}
        </select></div>
      <div><label for="{{ prefix }}-k">Results</label>
        <input type="text" id="{{ prefix }}-k" name="k" value="{{ k }}"></div>
    </div>
{% endmacro %}
<header>
  <h1>EEES person search</h1>
  <p>{{ count }} images ({{ counts }}) under {{ images }} &middot; model {{ model_id }}
     (step {{ step }})</p>
</header>
<main>
<aside>
  <form id="text-form" action="{{ url_for('page') }}" method="get">
    <h2>Search by sentence</h2>
    <label for="text-query">Description of the person</label>
    <textarea id="text-query" name="text"
      placeholder="a woman with long hair in a dark skirt, carrying a backpack">{{ text_value }}</textarea>
{{ gallery_and_k('text') }}    <button id="text-submit" type="submit">Search</button>
  </form>
  <form id="image-form" action="{{ url_for('search_image') }}" method="post"
        enctype="multipart/form-data">
    <h2>Search by image</h2>
    <label for="image-file">Query image</label>
    <input type="file" id="image-file" name="image" accept="image/*">
    <label for="image-modality">It is a</label>
    <select id="image-modality" name="modality">
      <option value="visible"{% if modality == 'visible' %} selected{% endif %}>visible (colour) image</option>
      <option value="infrared"{% if modality == 'infrared' %} selected{% endif %}>infrared image</option>
    </select>
    <label for="image-text">With a sentence (optional: fuses image and text)</label>
    <input type="text" id="image-text" name="text" placeholder="e.g. carrying a red backpack">
{{ gallery_and_k('image') }}    <button id="image-submit" type="submit">Search</button>
  </form>
</aside>
<section>
  {% if error %}<div class="error" id="error">{{ error }}</div>{% endif %}
  {% if query %}
  <div class="query" id="query">
    {% if query.image %}<img src="{{ query.image }}" alt="query image">{% endif %}
    <div>
      <div class="what">{{ query.what }}</div>
      {% if query.text %}<div class="sentence">&ldquo;{{ query.text }}&rdquo;</div>{% endif %}
    </div>
  </div>
  <div class="grid" id="results">
    {% for hit in hits %}
    <a class="result" href="{{ url_for('page', entry=hit.index, gallery=gallery, k=k) }}"
       data-path="{{ hit.entry.path }}" data-score="{{ '%.6f' % hit.score }}"
       title="{{ hit.entry.path }}: search with this image">
      <img src="{{ url_for('image', path=hit.entry.path) }}" alt="{{ hit.entry.path }}">
      <div class="rank">#{{ hit.rank }}</div>
      <div class="score">score {{ '%.3f' % hit.score }}</div>
      <span class="badge {{ hit.entry.modality }}">{{ hit.entry.modality }}{% if hit.entry.camera is not none %} &middot; cam{{ hit.entry.camera }}{% endif %}</span>
      <div class="path">{{ hit.entry.path }}</div>
    </a>
    {% endfor %}
  </div>
  {% elif not error %}
  <p class="hint">Type a description of a person, or upload an image of one and say whether it is a
  visible or an infrared image. Click any result to search with it.</p>
  {% endif %}
</section>
</main>
</body>
</html>
"""


def _decode_upload(data: bytes) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"))
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise search.SearchError(f"the uploaded file is not an image this page can read ({e})") from None


def _thumbnail_uri(image: np.ndarray) -> str:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(searcher: search.Searcher, k: int = 20):
  """The Flask application of one Searcher (an index with its model)."""
  import flask  # pylint: disable=g-import-not-at-top

  app = flask.Flask(__name__)
  app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
  index = searcher.index
  root = os.path.realpath(index.images)
  known = {e.path for e in index.entries}
  counts = ", ".join(f"{n} {m}" for m, n in index.meta.get("modalities", {}).items())
  default_k = k

  def params(source) -> tuple[int, str]:
    try:
      k = int(source.get("k", default_k))
    except ValueError:
      raise search.SearchError(f"results: {source.get('k')!r} is not a number") from None
    if not 1 <= k <= 500:
      raise search.SearchError(f"results: {k} is outside 1..500")
    return k, source.get("gallery", "all")

  def render(hits=(), query=None, error=None, status=200, k=default_k, gallery="all",
             text_value="", modality="visible"):
    html = flask.render_template_string(
        _PAGE, hits=hits, query=query, error=error, k=k, gallery=gallery, text_value=text_value,
        modality=modality,
        gallery_modalities=search.GALLERY_MODALITIES, count=len(index.entries), counts=counts,
        images=index.images, model_id=index.model["model_id"], step=index.model["step"])
    return html, status

  @app.get("/")
  def page():
    args = flask.request.args
    k, gallery = default_k, "all"
    try:
      k, gallery = params(args)
      if "entry" in args:
        try:
          i = int(args["entry"])
        except ValueError:
          raise search.SearchError(f"entry {args['entry']!r} is not an index position") from None
        hits = searcher.by_entry(i, k, gallery)
        e = index.entries[i]
        query = {"image": flask.url_for("image", path=e.path),
                 "what": f"indexed image {e.path} ({search.entry_label(e)}) → {gallery} images"}
        return render(hits, query, k=k, gallery=gallery)
      text = args.get("text", "")
      if text.strip():
        hits = searcher.by_text(text, k, gallery)
        query = {"text": text, "what": f"sentence → {gallery} images"}
        return render(hits, query, k=k, gallery=gallery, text_value=text)
      return render(k=k, gallery=gallery)
    except search.SearchError as e:
      return render(error=str(e), status=400, k=k, gallery=gallery)

  @app.post("/search/image")
  def search_image():
    form = flask.request.form
    upload = flask.request.files.get("image")
    modality, text = form.get("modality", ""), form.get("text", "").strip()
    k, gallery = default_k, "all"
    try:
      k, gallery = params(form)
      if upload is None or not upload.filename:
        raise search.SearchError("choose an image file to search with")
      image = _decode_upload(upload.read())
      if text:
        hits = searcher.by_image_and_text(image, modality, text, k, gallery)
        what = f"{modality} image + sentence → {gallery} images"
      else:
        hits = searcher.by_image(image, modality, k, gallery)
        what = f"{modality} image → {gallery} images"
    except search.SearchError as e:
      return render(error=str(e), status=400, k=k, gallery=gallery, modality=modality)
    query = {"image": _thumbnail_uri(image), "what": what, "text": text}
    return render(hits, query, k=k, gallery=gallery, modality=modality)

  @app.get("/image/<path:path>")
  def image(path: str):
    if path not in known:  # only what the index lists
      flask.abort(404)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([full, root]) != root or not os.path.isfile(full):
      flask.abort(404)  # a link out of the image folder, or a file gone since indexing
    return flask.send_file(full, max_age=3600)

  @app.errorhandler(413)
  def too_large(_):
    return render(error=f"the upload is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB",
                  status=413)

  return app


def main(argv: Sequence[str] | None = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  parser = argparse.ArgumentParser(prog="python -m eees_jax.serve",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--index", required=True, help="index folder (python -m eees_jax.search index)")
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
  parser.add_argument("--port", type=int, default=8000, help="port to listen on")
  parser.add_argument("-k", type=int, default=20, help="results shown by default")
  parser.add_argument("--workdir", help="model workdir (default: the one the index records)")
  parser.add_argument("--step", type=search.parse_step, default=None,
                      help="model step (default: the index's)")
  args = parser.parse_args(argv)
  try:
    index = search.read_index(args.index)
    searcher = search.Searcher(index, search.load_model(index, args.workdir, args.step))
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  app = create_app(searcher, args.k)
  print(f"serving {index.path} ({len(index.entries)} images) on http://{args.host}:{args.port}/",
        flush=True)
  app.run(host=args.host, port=args.port, threaded=False)
  return 0


if __name__ == "__main__":
  sys.exit(main())
