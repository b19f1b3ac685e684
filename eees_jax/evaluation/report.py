"""Human-readable evaluation output: results.json, a markdown table, CMC curves, ranked-list sheets.

Consumes the results dict of eees_jax.evaluation.protocols (percentages). Numbers from re-ranked
distances are labelled "re-ranked" wherever they appear; a setting whose ranking is not plain
query -> gallery (LLCM's DEEN layout) is marked in the table and explained under it. Results that
carry text-to-person retrieval rows (results["text_retrieval"], eees_jax.evaluation.text_retrieval)
get them as a section of their own after the image protocol's, with its title and notes. Plots use
matplotlib's object API with the Agg canvas (no display, no global backend switch); sheets are
drawn with PIL. Files are written through etils.epath, so a report may go to cloud storage.
"""
from __future__ import annotations

import io
import json
import os
from typing import Callable, Sequence

import numpy as np
from etils import epath

from data_pipelines.image_source import ImageSource, as_source
from data_pipelines.records import ImageRecord

_COLUMNS = (("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"), ("rank20", "Rank-20"),
            ("mAP", "mAP"), ("mINP", "mINP"))
_PROTOCOL_TEXT = {
    "sysu": "AGW eval_sysu: camera-3 queries ignore camera-2 gallery images",
    "regdb": "AGW eval_regdb: nothing removed",
    "llcm": "DEEN eval_llcm: gallery images of the query's identity and camera removed",
}


def _fmt(x: float) -> str:
  return f"{x:.2f}"


def _ranking_label(setting: dict) -> str:
  return "re-ranked" if setting.get("reranked") else "plain"


def _direction(setting: dict) -> str:
  """The table's "Query → gallery" cell; a setting with a note gets a pointer to it."""
  cell = f"{setting['query']} → {setting['gallery']}"
  return cell + " (see note)" if setting.get("note") else cell


def results_markdown(results: dict, title: str, notes: str | None = None,
                     cmc_image: str | None = None, level: int = 1) -> str:
  """The markdown of `write_report`: a summary table (means) and per-trial tables per setting,
  then the text-retrieval rows when the results have them. level: the title's heading level."""
  settings = results["settings"]
  trial_key = results.get("trial_key", "trial")
  h1, h2 = "#" * level, "#" * (level + 1)
  lines = [f"{h1} {title}", ""]
  kinds = sorted({s["cmc_kind"] for s in settings.values()})
  lines.append(
      f"Data set: {results['dataset']}. Protocol: {_PROTOCOL_TEXT.get(results['protocol'], results['protocol'])}. "
      f"Distance: {results.get('distance', 'cosine')}. Rank-k from the {' / '.join(kinds)} CMC "
      f"(the curve the reference code reports). Values in %.")
  if any(s.get("reranked") for s in settings.values()):
    lines.append("")
    lines.append("Rows marked **re-ranked** use k-reciprocal re-ranked distances; the others do not.")
  if notes:
    lines += ["", notes.strip()]
  header = "| Setting | Query → gallery | Ranking | " + " | ".join(h for _, h in _COLUMNS) + " |"
  rule = "|" + "---|" * (3 + len(_COLUMNS))
  n_trials = {len(s["trials"]) for s in settings.values()}
  what = f"{n_trials.pop()} {trial_key}s" if len(n_trials) == 1 else f"{trial_key}s"
  lines += ["", f"{h2} Mean over {what}", "", header, rule]
  for name, s in settings.items():
    label = _ranking_label(s)
    lines.append(f"| {name} | {_direction(s)} | {label} | "
                 + " | ".join(_fmt(s["mean"][k]) for k, _ in _COLUMNS) + " |")
  if any(s["cmc_kind"] != "standard" for s in settings.values()):
    lines += ["", "Standard CMC (mean), for comparison with the unique-identity curve above:", "",
              "| Setting | Ranking | Rank-1 | Rank-5 | Rank-10 | Rank-20 |", "|---|---|---|---|---|---|"]
    for name, s in settings.items():
      std = s["mean"]["cmc_standard"]
      lines.append(f"| {name} | {_ranking_label(s)} | "
                   + " | ".join(_fmt(std[min(k, len(std)) - 1]) for k in (1, 5, 10, 20)) + " |")
  if cmc_image:
    lines += ["", f"![CMC curves]({cmc_image})"]
  noted = {s["note"] for s in settings.values() if s.get("note")}
  for note in sorted(noted):
    marked = ", ".join(name for name, s in settings.items() if s.get("note") == note)
    lines += ["", f"Note ({marked}): {note}"]
  for name, s in settings.items():
    label = _ranking_label(s)
    lines += ["", f"{h2} {name}", "",
              f"{s['query']} queries, {s['gallery']} gallery, {label} distances; "
              f"{s['trials'][0]['num_queries']} queries, {s['trials'][0]['num_gallery']} gallery "
              f"images ({trial_key} {s['trials'][0][trial_key]})."
              + (f" {s['note']}" if s.get("note") else ""), "",
              f"| {trial_key.capitalize()} | Ranking | " + " | ".join(h for _, h in _COLUMNS) + " |",
              "|" + "---|" * (2 + len(_COLUMNS))]
    for t in s["trials"]:
      lines.append(f"| {t[trial_key]} | {label} | " + " | ".join(_fmt(t[k]) for k, _ in _COLUMNS)
                   + " |")
    lines.append(f"| **mean** | {label} | " + " | ".join(f"**{_fmt(s['mean'][k])}**" for k, _ in _COLUMNS)
                 + " |")
  text = results.get("text_retrieval")
  if text:
    lines += ["", results_markdown(text, text["title"], text.get("notes"), level=level + 1).rstrip()]
  return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str, title: str, notes: str | None = None,
                 plot: bool = True) -> str:
  """Writes out_dir/results.json, out_dir/results.md (and out_dir/cmc.png); returns the markdown."""
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=1))
  image = None
  if plot:
    plot_cmc(results, out / "cmc.png", title=title)
    image = "cmc.png"
  markdown = results_markdown(results, title, notes, cmc_image=image)
  (out / "results.md").write_text(markdown)
  return markdown


def _save_image(path: str | os.PathLike, draw: Callable[[io.BytesIO], None]) -> None:
  """Renders into memory, then writes the file in one piece (local or cloud path)."""
  buf = io.BytesIO()
  draw(buf)
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(buf.getvalue())


def plot_cmc(results: dict, path: str | os.PathLike, title: str | None = None) -> None:
  """Mean CMC curve of every setting (re-ranked ones dashed) into a PNG at `path`."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6.4, 4.4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for name, s in results["settings"].items():
    cmc = s["mean"]["cmc"]
    ranks = np.arange(1, len(cmc) + 1)
    label = f"{name} (R1 {cmc[0]:.1f}, mAP {s['mean']['mAP']:.1f})"
    ax.plot(ranks, cmc, linestyle="--" if s.get("reranked") else "-", marker="o", markersize=3,
            label=label)
  kinds = sorted({s["cmc_kind"] for s in results["settings"].values()})
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.set_xlabel("rank")
  ax.set_ylabel(f"matching rate (%), {' / '.join(kinds)} CMC")
  ax.set_title(title or f"{results['dataset']} CMC")
  ax.set_ylim(0, 100)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  _save_image(path, lambda f: fig.savefig(f, format="png"))


# ---------------------------------------------------------------- ranked-list sheet

_GREEN, _RED, _BLUE, _WHITE = (0, 170, 0), (220, 0, 0), (40, 80, 230), (255, 255, 255)


def _removed_mask(protocol: str | None, q: ImageRecord, gallery: Sequence[ImageRecord]) -> np.ndarray:
  """[G] bool: gallery images the protocol hides from query `q` (see metrics)."""
  if protocol in (None, "regdb"):
    return np.zeros(len(gallery), bool)
  if protocol == "sysu":
    return np.array([q.camid == 3 and g.camid == 2 for g in gallery])
  if protocol == "llcm":
    return np.array([g.pid == q.pid and g.camid == q.camid for g in gallery])
  raise ValueError(f"protocol={protocol!r}: expected None, 'sysu', 'regdb' or 'llcm'")


def _load_cell(source: ImageSource, record: ImageRecord, size: tuple[int, int], border: int,
               colour):
  import io
  from PIL import Image, ImageOps
  if source.missing(record):
    raise FileNotFoundError(f"ranked-list sheet: image {source.location(record)} (record "
                            f"{record.path}) does not exist")
  with Image.open(io.BytesIO(source.read_bytes(record))) as im:
    im = im.convert("RGB").resize((size[0] - 2 * border, size[1] - 2 * border), Image.BILINEAR)
  return ImageOps.expand(im, border=border, fill=colour)


def ranked_list_sheet(ranking: np.ndarray, query_records: Sequence[ImageRecord],
                      gallery_records: Sequence[ImageRecord], root: str | ImageSource, path: str,
                      num_queries: int = 8, top: int = 10,
                      query_indices: Sequence[int] | None = None, protocol: str | None = None,
                      cell: tuple[int, int] = (64, 128)) -> list[list[int]]:
  """Draws a PNG: one row per query, its image (blue frame) then its top gallery images, true
  matches framed green and false ones red, each captioned with rank, identity and camera.

  ranking: a distance matrix [Q, G] (float, smaller is closer; ties by gallery index) or ranked
    gallery indices [Q, >= top] (int).
  root: the data set folder, or the ImageSource of the records' images.
  query_indices: which queries (default: `num_queries` spread evenly over the query list).
  protocol: "sysu" / "llcm" hide the gallery images the protocol removes (as in the metrics).
  cell: (width, height) of one image cell in pixels.
  Returns the gallery indices shown, one list per row.
  """
  from PIL import Image, ImageDraw, ImageFont

  source = as_source(root)
  ranking = np.asarray(ranking)
  num_q = len(query_records)
  if ranking.ndim != 2 or ranking.shape[0] != num_q:
    raise ValueError(f"ranking must be [num_queries={num_q}, ...], got shape {ranking.shape}")
  if np.issubdtype(ranking.dtype, np.floating) and ranking.shape[1] != len(gallery_records):
    raise ValueError(f"distance matrix has {ranking.shape[1]} columns for {len(gallery_records)} "
                     "gallery records")
  if query_indices is None:
    query_indices = np.unique(np.linspace(0, num_q - 1, min(num_queries, num_q)).round().astype(int))
  shown = []
  for qi in query_indices:
    if np.issubdtype(ranking.dtype, np.floating):
      order = np.argsort(ranking[qi], kind="stable")
    else:
      order = ranking[qi]
    hidden = _removed_mask(protocol, query_records[qi], [gallery_records[g] for g in order])
    shown.append([int(g) for g in np.asarray(order)[~hidden][:top]])

  w, h = cell
  caption, gap, border = 14, 12, 4
  cols = 1 + top
  sheet = Image.new("RGB", (cols * w + gap + (cols - 1) * 2, len(shown) * (h + caption + 4)), _WHITE)
  draw = ImageDraw.Draw(sheet)
  font = ImageFont.load_default()
  for row, (qi, gallery_idx) in enumerate(zip(query_indices, shown)):
    y = row * (h + caption + 4)
    q = query_records[qi]
    sheet.paste(_load_cell(source, q, cell, border, _BLUE), (0, y))
    draw.text((2, y + h + 1), f"q {q.pid}/c{q.camid}", fill=(0, 0, 0), font=font)
    for rank, g in enumerate(gallery_idx, start=1):
      rec = gallery_records[g]
      x = w + gap + (rank - 1) * (w + 2)
      colour = _GREEN if rec.pid == q.pid else _RED
      sheet.paste(_load_cell(source, rec, cell, border, colour), (x, y))
      draw.text((x + 2, y + h + 1), f"{rank}: {rec.pid}/c{rec.camid}", fill=colour, font=font)
  _save_image(path, lambda f: sheet.save(f, format="PNG"))
  return shown
