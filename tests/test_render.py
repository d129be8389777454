"""HTML page, PNG contact sheet and recall plot from real search results on real images."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edje_qdrant.errors import InputError
from edje_qdrant.ingestion import ingest
from edje_qdrant.render import plot_recall, thumbnail, write_grid, write_html
from edje_qdrant.retriever import Retriever
from edje_qdrant.store import open_store


@pytest.fixture(scope="module")
def results(demo_folder, tiny_model):
    store = open_store(url=":memory:")
    assert ingest(demo_folder, store, tiny_model, "images").ingested == 12
    found = Retriever(store, "images", tiny_model).search("a red circle", k=7, rerank_k=12)
    store.close()
    return found


def test_html_has_query_scores_and_thumbnails_in_rank_order(results, tmp_path):
    out = write_html("a red circle", results, tmp_path / "sub" / "out.html")
    page = out.read_text(encoding="utf-8")
    assert "a red circle" in page
    ids = re.findall(r'data-id="([^"]+)"', page)
    assert ids == [r.id for r in results]
    for rank, r in enumerate(results, 1):
        assert f"#{rank}" in page and Path(r.path).name in page
        assert f"score {r.score:.4f}" in page and f"first-stage {r.first_stage_score:.4f}" in page
        assert f"rerank {r.rerank_score:.4f}" in page and r.page_content in page
    images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(images) == len(results)
    with Image.open(io.BytesIO(base64.b64decode(images[0]))) as im:
        assert max(im.size) == 192  # the 64 px demo images are scaled up to the thumbnail size


def test_html_escapes_text_and_survives_missing_files(results, tmp_path):
    hostile = "<script>alert('x')</script> & friends"
    gone = results[0].to_dict() | {"path": str(tmp_path / "deleted.jpg"), "page_content": "<b>caption</b>"}
    page = write_html(hostile, [gone, *results[1:3]], tmp_path / "out.html").read_text(encoding="utf-8")
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert "<b>caption</b>" not in page and "no preview" in page
    assert page.count("data:image/jpeg;base64,") == 2


def test_grid_png_shows_the_top_results_in_order(results, tmp_path):
    out = write_grid("a red circle", results, tmp_path / "grid.png", columns=3, thumb_px=96)
    with Image.open(out) as sheet:
        sheet = sheet.convert("RGB")
        pad, text_h, header_h = 10, 58, 62  # header: query line + score legend line
        cell_w, cell_h = 96 + 2 * pad, 96 + text_h + 2 * pad
        assert sheet.size == (3 * cell_w, header_h + 3 * cell_h)  # 7 results -> 3 rows of 3
        for i, r in enumerate(results):
            x0, y0 = (i % 3) * cell_w + pad, header_h + (i // 3) * cell_h + pad
            thumb = thumbnail(r.path, 96)
            tx, ty = x0 + (96 - thumb.width) // 2, y0 + (96 - thumb.height) // 2
            region = sheet.crop((tx, ty, tx + thumb.width, ty + thumb.height))
            np.testing.assert_array_equal(np.asarray(region), np.asarray(thumb), err_msg=f"cell {i}: {r.path}")
        # the text rows under each thumbnail are drawn (dark pixels in the band)
        band = np.asarray(sheet.crop((pad, header_h + pad + 96, pad + 96, header_h + pad + 96 + text_h)))
        assert (band < 100).any()


def test_grid_with_no_results_and_bad_arguments(tmp_path):
    out = write_grid("nothing", [], tmp_path / "empty.png")
    with Image.open(out) as im:
        assert im.width > 0
    with pytest.raises(InputError, match="thumb_px"):
        write_grid("x", [], tmp_path / "bad.png", thumb_px=4)
    with pytest.raises(InputError, match="is a folder"):
        write_grid("x", [], tmp_path)


def test_plot_recall_draws_each_series(tmp_path):
    data = {0: {"R@1": 0.31, "R@5": 0.60}, 10: {"R@1": 0.40, "R@5": 0.70}, 100: {"R@1": 0.46, "R@5": 0.75}}
    out = plot_recall(data, tmp_path / "plots" / "recall.png")
    with Image.open(out) as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in px}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # one colour per series
    single = plot_recall({0: 40.0, 50: 55.5}, tmp_path / "pct.png")  # percentages, one line
    assert single.stat().st_size > 0
    for bad in ({}, {-1: 0.5}, {10: float("nan")}, {10: {"R@1": "high"}}):
        with pytest.raises(InputError, match="plot_recall"):
            plot_recall(bad, tmp_path / "bad.png")


def test_render_options_on_a_click_command(results, tmp_path):
    from edje_qdrant.cli.render_options import render_options, write_renders

    @click.command()
    @render_options
    def show(html, grid):
        write_renders("a red circle", results, html, grid)

    res = CliRunner().invoke(show, ["--html", str(tmp_path / "r.html"), "--grid", str(tmp_path / "r.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0
    assert "wrote" in res.output
