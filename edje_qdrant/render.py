"""Results people can look at: an HTML page, a PNG contact sheet, and a recall-vs-rerank_k plot (Pillow only).

Results are ``SearchResult`` objects or their ``to_dict()`` form (what the HTTP service returns). Unreadable
images get a grey placeholder; the page and the sheet are still written.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import math
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from edje_qdrant.errors import InputError
from edje_qdrant.schema import METADATA_KEY, PAGE_CONTENT_KEY, SOURCE_KEY
from edje_qdrant.scores import FIRST_STAGE_LEGEND, infer_fusion_weight, score_formula

log = logging.getLogger(__name__)

__all__ = ["write_html", "write_grid", "plot_recall", "thumbnail"]

MAX_RESULTS = 1000  # a page or sheet with more is not something people look at
_MAX_PIXELS = 100_000_000  # refuse to decode larger images for a thumbnail
_BG = (255, 255, 255)
_INK = (25, 25, 25)
_MUTED = (110, 110, 110)
_PLACEHOLDER = (200, 200, 200)
_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


# --------------------------------------------------------------------------- shared


def _fields(result: Any) -> dict[str, Any]:
    d = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    meta = d.get(METADATA_KEY) or {}
    path = d.get("path") or meta.get(SOURCE_KEY)
    return {
        "id": str(d.get("id", "")),
        "path": str(path) if path else None,
        "score": _num(d.get("score")),
        "first": _num(d.get("first_stage_score")),
        "rerank": _num(d.get("rerank_score")),
        "caption": str(d.get(PAGE_CONTENT_KEY) or ""),
        "flags": [str(f) for f in d.get("flags") or []],
    }


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _check(results: Sequence[Any], path: str | Path) -> tuple[list[dict[str, Any]], Path]:
    if len(results) > MAX_RESULTS:
        raise InputError(f"{len(results)} results is more than {MAX_RESULTS} to render; lower -k")
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{out} is a folder; give a file name such as results.html / results.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    return [_fields(r) for r in results], out


def thumbnail(path: str | Path | None, size: int) -> Image.Image | None:
    """An RGB thumbnail that fits ``size`` x ``size`` (EXIF orientation applied; images under half the size are
    scaled up), or None when unreadable."""
    if not path:
        return None
    _register_heif()
    try:
        with Image.open(path) as im:
            if im.width * im.height > _MAX_PIXELS:
                log.warning("%s: %dx%d is too large to thumbnail", path, im.width, im.height)
                return None
            im.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            if max(im.size) > size:
                im.thumbnail((size, size))
            elif max(im.size) < size // 2:  # tiny images: scale up so they can be seen, keeping the aspect
                im = ImageOps.contain(im, (size, size), Image.Resampling.NEAREST)
            return im
    except Exception as exc:  # unreadable/corrupt/missing file: Pillow raises many kinds
        log.warning("no thumbnail for %s: %s", path, exc)
        return None


def _register_heif() -> None:
    try:
        from pillow_heif import register_heif_opener  # cost: HEIF decoders load only when a thumbnail is drawn

        register_heif_opener()
    except Exception:  # pillow-heif is a dependency, but a thumbnail is not worth failing for
        pass


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


_ASCII_FALLBACK = {"×": "x", "–": "-", "—": "-", "‘": "'", "’": "'", "…": "..."}


def drawable(text: str, font: Any) -> str:
    """``text`` with each character the font has no glyph for (drawn as a box) replaced: typographic signs by
    their ASCII look-alike, accented letters by the bare letter; other characters stay as they are."""
    missing = _missing_glyph(font)
    if missing is None:
        return text
    out = []
    for ch in text:
        if ch.isascii() or _glyph(font, ch) != missing:
            out.append(ch)
            continue
        bare = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
        out.append(_ASCII_FALLBACK.get(ch) or (bare if bare and all(_glyph(font, c) != missing for c in bare) else ch))
    return "".join(out)


def _glyph(font: Any, ch: str) -> tuple[Any, bytes] | None:
    try:
        mask = font.getmask(ch)
    except Exception:  # a bitmap font that cannot encode the character
        return None
    return mask.size, bytes(mask)


def _missing_glyph(font: Any) -> tuple[Any, bytes] | None:
    """What the font draws for a character it lacks (its "missing glyph" box); None for fonts without one."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return None
    return _glyph(font, "\U0010FFFD")  # a private-use code point no font covers


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` cut with an ellipsis so it fits ``width`` pixels, in characters the font can draw."""
    text = drawable(" ".join(text.split()), font)
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "…", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


# --------------------------------------------------------------------------- HTML


def _legend(rows: list[dict[str, Any]], fusion_weight: float | None) -> str:
    """How ``score`` is formed, for the page/sheet: a list where no hit was re-ranked (``--rerank-k 0``, search by
    image) is sorted by the first-stage cosine whatever the model's fusion weight; else the formula, with the
    weight inferred from the rows when not given."""
    if not any(r["rerank"] is not None for r in rows) and (rows or fusion_weight is None):
        return FIRST_STAGE_LEGEND
    if fusion_weight is None:
        fusion_weight = infer_fusion_weight((r["score"], r["first"], r["rerank"]) for r in rows)
    return score_formula(fusion_weight)


def write_html(query: str, results: Sequence[Any], path: str | Path, *, thumb_px: int = 192,
               title: str | None = None, fusion_weight: float | None = None) -> Path:
    """A self-contained HTML page (thumbnails embedded) with the query and the three scores of each result.

    ``fusion_weight``: the model's (for the legend); inferred from the results when None."""
    rows, out = _check(results, path)
    esc = html.escape
    cards = []
    for rank, r in enumerate(rows, 1):
        thumb = thumbnail(r["path"], thumb_px)
        if thumb is not None:
            buf = io.BytesIO()
            thumb.save(buf, "JPEG", quality=85)
            src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            img = f'<img src="{src}" alt="{esc(Path(r["path"]).name)}">'
        else:
            img = '<div class="missing">no preview</div>'
        link = Path(r["path"]).resolve().as_uri() if r["path"] else None
        name = esc(Path(r["path"]).name) if r["path"] else esc(r["id"])
        if link:
            img = f'<a href="{esc(link)}">{img}</a>'
        flags = f'<div class="flags">{esc("; ".join(r["flags"]))}</div>' if r["flags"] else ""
        cards.append(
            f'<figure class="card" data-id="{esc(r["id"])}">'
            f"{img}"
            f'<figcaption><b>#{rank}</b> <span class="score">score {_fmt(r["score"])}</span><br>'
            f'rerank {_fmt(r["rerank"])} · first-stage {_fmt(r["first"])}<br>'
            f'<span class="name" title="{esc(r["path"] or "")}">{name}</span><br>'
            f'<span class="caption">{esc(r["caption"])}</span>{flags}</figcaption></figure>'
        )
    heading = esc(title or f"edje-qdrant results for “{query}”")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{heading}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax({thumb_px + 24}px, 1fr)); gap: 1rem; }}
.card {{ margin: 0; padding: .5rem; border: 1px solid #ddd; border-radius: 6px; }}
.card img, .missing {{ display: block; max-width: {thumb_px}px; max-height: {thumb_px}px; margin: auto; }}
.missing {{ width: {thumb_px}px; height: {thumb_px}px; background: #ccc; color: #555; text-align: center;
  line-height: {thumb_px}px; }}
figcaption {{ font-size: .85rem; margin-top: .4rem; word-break: break-all; }}
.score {{ font-weight: 600; }} .caption {{ color: #555; }} .flags {{ color: #b00; }}
</style></head><body>
<h1>{heading}</h1>
<p>Query: <q class="query">{esc(query)}</q> · {len(rows)} results · {when}.
<span class="legend">{esc(_legend(rows, fusion_weight))}</span>
(first-stage: cosine of the ANN search; rerank: the joint encoder's logit).</p>
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
"""
    out.write_text(page, encoding="utf-8")
    return out


# --------------------------------------------------------------------------- contact sheet


def write_grid(query: str, results: Sequence[Any], path: str | Path, *, columns: int = 5,
               thumb_px: int = 192, fusion_weight: float | None = None) -> Path:
    """A PNG contact sheet: the query and the score legend on top, then each result's thumbnail, rank, scores
    and file name. ``fusion_weight``: as in ``write_html``."""
    rows, out = _check(results, path)
    if columns < 1 or not 32 <= thumb_px <= 1024:
        raise InputError("columns must be >= 1 and thumb_px between 32 and 1024")
    cols = max(1, min(columns, len(rows) or 1))
    pad, text_h = 10, 58
    cell_w, cell_h = thumb_px + 2 * pad, thumb_px + text_h + 2 * pad
    header_h = 62
    legend = _legend(rows, fusion_weight)
    n_rows = max(1, math.ceil(len(rows) / cols))
    sheet = Image.new("RGB", (cols * cell_w, header_h + n_rows * cell_h), _BG)
    draw = ImageDraw.Draw(sheet)
    big, small = _font(18), _font(13)
    draw.text((pad, 12), _fit(draw, f"query: {query}", big, sheet.width - 2 * pad), fill=_INK, font=big)
    draw.text((pad, 38), _fit(draw, legend, small, sheet.width - 2 * pad), fill=_MUTED, font=small)
    if not rows:
        draw.text((pad, header_h + pad), "no results", fill=_MUTED, font=small)
    for i, r in enumerate(rows):
        x0 = (i % cols) * cell_w + pad
        y0 = header_h + (i // cols) * cell_h + pad
        thumb = thumbnail(r["path"], thumb_px)
        if thumb is None:
            draw.rectangle((x0, y0, x0 + thumb_px - 1, y0 + thumb_px - 1), fill=_PLACEHOLDER)
            draw.text((x0 + 8, y0 + thumb_px // 2 - 8), "no preview", fill=_MUTED, font=small)
        else:
            sheet.paste(thumb, (x0 + (thumb_px - thumb.width) // 2, y0 + (thumb_px - thumb.height) // 2))
        draw.rectangle((x0 - 1, y0 - 1, x0 + thumb_px, y0 + thumb_px), outline=(220, 220, 220))
        ty = y0 + thumb_px + 4
        draw.text((x0, ty), _fit(draw, f"#{i + 1}  score {_fmt(r['score'])}", small, thumb_px), fill=_INK, font=small)
        second = f"rerank {_fmt(r['rerank'])}  first {_fmt(r['first'])}"
        draw.text((x0, ty + 17), _fit(draw, second, small, thumb_px), fill=_MUTED, font=small)
        name = Path(r["path"]).name if r["path"] else r["id"]
        colour = (176, 0, 0) if r["flags"] else _MUTED
        draw.text((x0, ty + 34), _fit(draw, name, small, thumb_px), fill=colour, font=small)
    info = PngInfo()  # the legend and query as text chunks too (readable by tools, and by the tests)
    info.add_text("query", query)
    info.add_text("score-legend", legend)
    sheet.save(out, "PNG", pnginfo=info)
    return out


# --------------------------------------------------------------------------- recall plot


def plot_recall(results_by_k: Mapping[int, float | Mapping[str, float]], path: str | Path, *,
                title: str = "Recall vs rerank_k", width: int = 760, height: int = 460) -> Path:
    """Line plot of recall against rerank_k (0 = first stage only) as a PNG.

    ``results_by_k`` maps rerank_k to one recall value, or to ``{"R@1": .., "R@5": ..}`` for several lines.
    Values in [0, 1] are drawn on a 0-1 axis, larger ones (percentages) on 0-100.
    """
    series = _series(results_by_k)
    ks = sorted(results_by_k)
    values = [v for s in series.values() for v in s.values()]
    top = 100.0 if max(values) > 1.0 else 1.0
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    f_title, f_axis = _font(18), _font(13)
    left, right, top_m, bottom = 64, 150, 44, 56
    pw, ph = width - left - right, height - top_m - bottom
    draw.text((left, 12), _fit(draw, title, f_title, width - left - 10), fill=_INK, font=f_title)
    for j in range(6):  # y grid and labels
        y = top_m + ph - ph * j / 5
        draw.line((left, y, left + pw, y), fill=(230, 230, 230))
        label = f"{top * j / 5:.1f}" if top == 1.0 else f"{top * j / 5:.0f}"
        draw.text((left - 8 - draw.textlength(label, font=f_axis), y - 7), label, fill=_MUTED, font=f_axis)
    draw.rectangle((left, top_m, left + pw, top_m + ph), outline=_INK)

    def x_of(i: int) -> float:
        return left + (pw / 2 if len(ks) == 1 else pw * (0.04 + 0.92 * i / (len(ks) - 1)))

    for i, k in enumerate(ks):
        x = x_of(i)
        draw.line((x, top_m + ph, x, top_m + ph + 5), fill=_INK)
        label = str(k)
        draw.text((x - draw.textlength(label, font=f_axis) / 2, top_m + ph + 8), label, fill=_INK, font=f_axis)
    axis = "rerank_k (0 = first stage only)"
    draw.text((left + pw / 2 - draw.textlength(axis, font=f_axis) / 2, height - 24), axis, fill=_INK, font=f_axis)
    draw.text((8, top_m - 22), "recall", fill=_INK, font=f_axis)
    for n, (name, points) in enumerate(series.items()):
        colour = _PALETTE[n % len(_PALETTE)]
        xy = [(x_of(i), top_m + ph - ph * min(max(points[k] / top, 0.0), 1.0)) for i, k in enumerate(ks) if k in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3)
        for x, y in xy:
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        ly = top_m + 6 + n * 20
        draw.line((left + pw + 14, ly + 7, left + pw + 34, ly + 7), fill=colour, width=3)
        draw.text((left + pw + 40, ly), _fit(draw, name, f_axis, right - 46), fill=_INK, font=f_axis)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, "PNG")
    return out


def _series(results_by_k: Mapping[Any, Any]) -> dict[str, dict[int, float]]:
    if not results_by_k:
        raise InputError("plot_recall: no results to plot (results_by_k is empty)")
    series: dict[str, dict[int, float]] = {}
    for k, value in results_by_k.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"plot_recall: rerank_k must be an integer >= 0, got {k!r}")
        items: Iterable[tuple[str, Any]] = value.items() if isinstance(value, Mapping) else [("recall", value)]
        for name, v in items:
            fv = _num(v)
            if fv is None or not math.isfinite(fv) or fv < 0:
                raise InputError(f"plot_recall: value for rerank_k={k}, {name!r} must be a number >= 0, got {v!r}")
            series.setdefault(str(name), {})[k] = fv
    return series
