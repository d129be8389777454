"""Issue 12 (A): one score vocabulary on every surface. ``score`` is what the list is sorted by (re-ranked:
rerank_score + fusion_weight x first_stage_score; else first_stage_score), ``first_stage_score`` the ANN cosine,
``rerank_score`` the joint encoder's logit. A model with a non-zero fusion weight (0.5) makes the three differ."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
from click.testing import CliRunner
from PIL import Image

from edje_qdrant.cli.main import main
from edje_qdrant.render import write_grid, write_html
from edje_qdrant.retriever import Retriever
from edje_qdrant.scores import infer_fusion_weight, score_formula

W = 0.5
QUERY = "a red circle"


def _ingested(tmp_path_factory, demo_folder):
    store = tmp_path_factory.mktemp("scores") / "store"
    res = CliRunner().invoke(main, ["ingest", str(demo_folder), "--store", str(store), "--model", "tiny-random",
                                    "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, demo_folder):
    """A store for the CLI tests (the embedded store is one process/handle at a time)."""
    return _ingested(tmp_path_factory, demo_folder)


@pytest.fixture(scope="module")
def fused(tmp_path_factory, demo_folder, tiny_model):
    model = dataclasses.replace(tiny_model, fusion_weight=W)  # same weights and fingerprint, fused score
    with Retriever(str(_ingested(tmp_path_factory, demo_folder)), model=model) as r:
        yield r


def assert_vocabulary(rows, weight):
    """rows: (score, first_stage_score, rerank_score) in list order."""
    scores = [s for s, _, _ in rows]
    assert scores == sorted(scores, reverse=True), "the list must be sorted by score"
    for score, first, rerank in rows:
        expected = first if rerank is None else rerank + weight * first
        assert score == pytest.approx(expected, abs=1e-4)


def test_retriever_scores_fused_and_first_stage(fused):
    hits = fused.search(QUERY, k=5, rerank_k=10)
    assert all(h.rerank_score is not None for h in hits)
    assert_vocabulary([(h.score, h.first_stage_score, h.rerank_score) for h in hits], W)
    assert any(abs(h.score - h.rerank_score) > 1e-3 for h in hits)  # the weight really shows
    plain = fused.search(QUERY, k=5, rerank_k=0)
    assert all(h.rerank_score is None and h.score == h.first_stage_score for h in plain)
    assert_vocabulary([(h.score, h.first_stage_score, h.rerank_score) for h in plain], W)


@pytest.mark.parametrize("rerank_k", ["10", "0"])
def test_cli_text_and_json_print_the_same_score(store_path, rerank_k):
    base = ["search", QUERY, "--store", str(store_path), "-k", "4", "--rerank-k", rerank_k]
    text = CliRunner().invoke(main, base)
    js = CliRunner().invoke(main, base + ["--json"])
    assert text.exit_code == 0 and js.exit_code == 0, text.output + js.output
    hits = json.loads(js.output)
    lines = text.output.strip().splitlines()
    assert [ln.split("  ", 1)[0] for ln in lines] == [f"{h['score']:.4f}" for h in hits]
    assert_vocabulary([(h["score"], h["first_stage_score"], h["rerank_score"]) for h in hits], 0.0)
    if rerank_k == "0":
        assert all(h["rerank_score"] is None for h in hits)


def test_search_help_says_how_score_is_formed():
    res = CliRunner().invoke(main, ["search", "--help"])
    assert res.exit_code == 0
    out = " ".join(res.output.split())
    assert "score what the list is sorted by: rerank_score + fusion_weight x first_stage_score" in out
    assert "first_stage_score cosine similarity" in out and "rerank_score the joint encoder's logit" in out


def _cards(page: str) -> list[tuple[float, float, float | None]]:
    rows = []
    for fig in re.findall(r'<figure class="card".*?</figure>', page, flags=re.S):
        score = float(re.search(r'class="score">score ([-\d.]+)<', fig).group(1))
        rerank = re.search(r"rerank ([-\d.]+|-) · first-stage ([-\d.]+)", fig)
        rows.append((score, float(rerank.group(2)), None if rerank.group(1) == "-" else float(rerank.group(1))))
    return rows


@pytest.mark.parametrize("given", [W, None])  # the CLI passes the model's weight; else it is read off the rows
def test_html_legend_matches_the_numbers(fused, tmp_path, given):
    hits = fused.search(QUERY, k=5, rerank_k=10)
    page = write_html(QUERY, hits, tmp_path / "r.html", fusion_weight=given).read_text(encoding="utf-8")
    legend = re.search(r'<span class="legend">(.*?)</span>', page).group(1)
    assert legend == score_formula(W)
    assert "rerank + 0.5 x first-stage" in legend and "rerank logit" not in page
    rows = _cards(page)
    assert len(rows) == 5
    for score, first, rerank in rows:  # 4 decimals on the page
        assert score == pytest.approx(rerank + W * first, abs=2e-4)


def test_html_legend_when_not_reranked(fused, tmp_path):
    hits = fused.search(QUERY, k=3, rerank_k=0)
    page = write_html(QUERY, hits, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "score = first-stage (not re-ranked)" in page
    assert all(score == first and rerank is None for score, first, rerank in _cards(page))


def test_grid_carries_the_same_legend(fused, tmp_path):
    hits = fused.search(QUERY, k=4, rerank_k=10)
    out = write_grid(QUERY, hits, tmp_path / "g.png", fusion_weight=W)
    with Image.open(out) as img:
        assert img.text["score-legend"] == score_formula(W)
        assert img.text["query"] == QUERY


def test_cli_html_uses_the_models_weight(store_path, tmp_path):
    page = tmp_path / "cli.html"
    res = CliRunner().invoke(main, ["search", QUERY, "--store", str(store_path), "-k", "3", "--rerank-k", "6",
                                    "--html", str(page)])
    assert res.exit_code == 0, res.output
    text = page.read_text(encoding="utf-8")
    assert score_formula(0.0) in text  # tiny-random has no fusion: score = rerank
    for score, _, rerank in _cards(text):
        assert score == pytest.approx(rerank, abs=1e-4)


def test_infer_fusion_weight():
    assert infer_fusion_weight([(None, 0.3, None), (2.0, 0.5, 1.0)]) == pytest.approx(2.0)
    assert infer_fusion_weight([(0.3, 0.3, None)]) is None


def test_http_results_use_the_vocabulary(fused):
    pytest.importorskip("fastapi", reason="optional extra: pip install 'edje-qdrant[service]'")
    from fastapi.testclient import TestClient

    from edje_qdrant.service import create_app

    with TestClient(create_app(fused)) as c:
        body = c.post("/search", json={"query": QUERY, "k": 4, "rerank_k": 10}).json()
        schema = c.get("/openapi.json").json()["components"]["schemas"]["ResultOut"]["properties"]
    assert_vocabulary([(r["score"], r["first_stage_score"], r["rerank_score"]) for r in body["results"]], W)
    assert "sorted by" in schema["score"]["description"]
    assert "cosine" in schema["first_stage_score"]["description"].lower()
    assert "logit" in schema["rerank_score"]["description"]


def test_langchain_metadata_uses_the_vocabulary(fused):
    pytest.importorskip("langchain_core", reason="optional extra: pip install 'edje-qdrant[langchain]'")
    from edje_qdrant.integrations.langchain import EDJERetriever, EDJEReranker

    docs = EDJERetriever(retriever=fused, k=4, rerank_k=10).invoke(QUERY)
    assert_vocabulary([(d.metadata["score"], d.metadata["first_stage_score"], d.metadata["rerank_score"])
                       for d in docs], W)
    reranked = EDJEReranker(retriever=fused).compress_documents(list(reversed(docs)), QUERY)
    for d in reranked:  # relevance_score is what the compressor sorts by: the same number as score
        assert d.metadata["relevance_score"] == d.metadata["score"]
    rel = [d.metadata["relevance_score"] for d in reranked]
    assert rel == sorted(rel, reverse=True)


def test_llamaindex_scores_use_the_vocabulary(fused):
    pytest.importorskip("llama_index.core", reason="optional extra: pip install 'edje-qdrant[llamaindex]'")
    from edje_qdrant.integrations.llamaindex import EDJERetriever, EDJEReranker

    nodes = EDJERetriever(fused, k=4, rerank_k=10).retrieve(QUERY)
    for n in nodes:
        assert n.score == n.node.metadata["score"]
    assert_vocabulary([(n.node.metadata["score"], n.node.metadata["first_stage_score"],
                        n.node.metadata["rerank_score"]) for n in nodes], W)
    again = EDJEReranker(retriever=fused).postprocess_nodes(list(reversed(nodes)), query_str=QUERY)
    for n in again:
        assert n.score == n.node.metadata["score"]
    assert_vocabulary([(n.score, n.node.metadata["first_stage_score"], n.node.metadata["rerank_score"])
                       for n in again], W)


def _has_glyph(font, ch: str) -> bool:
    """Whether Pillow's default font draws ``ch`` as itself rather than its missing-glyph box."""
    missing = font.getmask("\U0010FFFD")
    mask = font.getmask(ch)
    return (mask.size, bytes(mask)) != (missing.size, bytes(missing))


def test_grid_legend_is_drawn_in_glyphs_the_font_has(fused, tmp_path):
    from PIL import ImageFont

    hits = fused.search(QUERY, k=3, rerank_k=10)
    out = write_grid(QUERY, hits, tmp_path / "g.png", fusion_weight=15.6)
    with Image.open(out) as img:
        legend = img.text["score-legend"]
    assert "rerank + 15.6 x first-stage" in legend
    font = ImageFont.load_default(size=13)  # the sheet's font
    assert [ch for ch in legend if not _has_glyph(font, ch)] == []


def test_sheet_text_falls_back_to_characters_the_font_has():
    from PIL import ImageFont

    from edje_qdrant.render import drawable

    font = ImageFont.load_default(size=13)
    assert not _has_glyph(font, "×") and not _has_glyph(font, "é")  # why the fallback exists
    text = drawable("15.6 × first-stage – café Zürich", font)
    assert text == "15.6 x first-stage - cafe Zurich"
    assert all(_has_glyph(font, ch) for ch in text)


@pytest.mark.parametrize("how", ["rerank-k 0", "image"])
def test_lists_not_reranked_say_so_in_the_legend(store_path, demo_folder, tmp_path, how):
    """`--rerank-k 0` and `--image` lists are sorted by the first-stage cosine: their legend must not describe the
    re-rank formula, whatever the model's fusion weight."""
    photo = next(p for p in sorted(demo_folder.rglob("*")) if p.suffix in (".png", ".jpg"))
    what = [QUERY, "--rerank-k", "0"] if how == "rerank-k 0" else ["--image", str(photo)]
    page, sheet = tmp_path / "r.html", tmp_path / "r.png"
    res = CliRunner().invoke(main, ["search", *what, "--store", str(store_path), "-k", "3", "--html", str(page),
                                    "--grid", str(sheet)])
    assert res.exit_code == 0, res.output
    legend = re.search(r'<span class="legend">(.*?)</span>', page.read_text(encoding="utf-8")).group(1)
    with Image.open(sheet) as img:
        assert img.text["score-legend"] == legend
    assert legend.startswith("score = first-stage (not re-ranked)") and "rerank" not in legend.replace("re-ranked", "")
