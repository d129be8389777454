"""Retriever end to end on real stores (Qdrant Edge and qdrant-client local mode) with the tiny-random model."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from edje_qdrant.codec import decode_tokens

from edje_qdrant.schema import TOKENS_KEY
from edje_qdrant.errors import InputError, ModelMismatchError, StoreError
from edje_qdrant.ingestion import ingest
from edje_qdrant.retriever import Retriever
from edje_qdrant.store import open_store
from edje_qdrant.store.base import PointRecord


@pytest.fixture(params=["edge", "memory"])
def filled(request, tmp_path, demo_folder, tiny_model):
    store = open_store(path=str(tmp_path / "store")) if request.param == "edge" else open_store(url=":memory:")
    report = ingest(demo_folder, store, tiny_model, "images")
    assert report.ingested == 12 and report.failed == 0
    yield store
    store.close()


def test_search_returns_reranked_results_best_first(filled, tiny_model):
    r = Retriever(filled, "images", tiny_model)
    results = r.search("a red circle", k=5, rerank_k=10)
    assert len(results) == 5
    assert all(x.rerank_score is not None and x.first_stage_score is not None for x in results)
    scores = [x.score for x in results]
    assert scores == sorted(scores, reverse=True)
    assert all(x.score == x.rerank_score for x in results)
    assert all(x.path and x.path.endswith((".png", ".jpg")) for x in results)
    assert all(x.metadata["sha256"] and x.page_content.startswith("a ") for x in results)


def test_rerank_scores_are_the_model_logits_for_stored_tokens(filled, tiny_model):
    r = Retriever(filled, "images", tiny_model)
    results = r.search("a blue square", k=3, rerank_k=12)
    stored = filled.retrieve("images", [x.id for x in results], [TOKENS_KEY])
    by_id = {h.id: decode_tokens(h.payload[TOKENS_KEY]) for h in stored}
    expected = tiny_model.rerank("a blue square", np.stack([by_id[x.id] for x in results]))
    np.testing.assert_allclose([x.rerank_score for x in results], expected, rtol=1e-4, atol=1e-4)


def test_rerank_k_zero_gives_first_stage_order(filled, tiny_model):
    r = Retriever(filled, "images", tiny_model)
    results = r.search("a green circle", k=12, rerank_k=0)
    assert all(x.rerank_score is None for x in results)
    first = [x.first_stage_score for x in results]
    assert first == sorted(first, reverse=True) and [x.score for x in results] == first


def test_fewer_points_than_rerank_k(filled, tiny_model):
    results = Retriever(filled, "images", tiny_model).search("anything", k=10, rerank_k=100)
    assert len(results) == 10
    assert len({x.id for x in results}) == 10


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(query="", k=1, rerank_k=1), "empty"),
        (dict(query="   ", k=1, rerank_k=1), "empty"),
        (dict(query="x" * 10_001, k=1, rerank_k=1), "limit"),
        (dict(query="x", k=0, rerank_k=10), "at least 1"),
        (dict(query="x", k=20, rerank_k=10), "larger than rerank_k"),
        (dict(query="x", k=5, rerank_k=-1), "rerank_k"),
        (dict(query=None, k=5, rerank_k=5), "string"),
    ],
)
def test_bad_arguments_raise_input_error(filled, tiny_model, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        Retriever(filled, "images", tiny_model).search(**kwargs)


def test_long_query_with_control_characters_is_scored(filled, tiny_model):
    query = ("a dog\x00\x07 on\tthe beach " * 500)[:10_000]
    results = Retriever(filled, "images", tiny_model).search(query, k=3, rerank_k=5)
    assert len(results) == 3 and all(x.rerank_score is not None for x in results)


def test_bad_blob_keeps_first_stage_score_and_is_flagged(filled, tiny_model, caplog):
    from PIL import Image

    r = Retriever(filled, "images", tiny_model)
    baseline = r.search("a red square", k=12, rerank_k=12)
    victim = sorted(baseline, key=lambda x: -x.first_stage_score)[3]
    point = filled.retrieve("images", [victim.id], None)[0]
    with Image.open(victim.path) as im:
        pixels = tiny_model.vision.preprocess(im.convert("RGB"))[None]
    vector = tiny_model.embed_images(pixels)[0][0]
    payload = dict(point.payload, **{TOKENS_KEY: "this is not a token blob"})
    filled.upsert("images", [PointRecord(id=victim.id, vector=vector.tolist(), payload=payload)])
    with caplog.at_level("WARNING"):
        results = r.search("a red square", k=12, rerank_k=12)
    bad = next(x for x in results if x.id == victim.id)
    assert bad.rerank_score is None and bad.flags and "rerank_failed" in bad.flags[0]
    assert bad.score == bad.first_stage_score
    first_stage_rank = sorted(results, key=lambda x: -x.first_stage_score).index(bad)
    assert results.index(bad) == first_stage_rank  # keeps its first-stage slot
    assert all(x.rerank_score is not None for x in results if x.id != victim.id)
    assert victim.id in caplog.text


@pytest.mark.parametrize("filled", ["edge"], indirect=True)  # qdrant-client local mode serialises calls anyway
def test_concurrent_searches_match_sequential(filled, tiny_model):
    r = Retriever(filled, "images", tiny_model)
    queries = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")]
    expected = {q: [(x.id, round(x.score, 5)) for x in r.search(q, k=5, rerank_k=10)] for q in queries}
    errors: list[BaseException] = []
    mismatches: list[str] = []

    def worker(offset: int) -> None:
        try:
            for i in range(50):
                q = queries[(i + offset) % len(queries)]
                got = [(x.id, round(x.score, 5)) for x in r.search(q, k=5, rerank_k=10)]
                if got != expected[q]:
                    mismatches.append(q)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches


def test_missing_collection_and_model_mismatch(filled, tiny_model):
    with pytest.raises(StoreError, match="does not exist"):
        Retriever(filled, "nope", tiny_model)
    from edje_qdrant.models import load_model

    other = load_model("tiny-random", device="cpu")
    other.fingerprint = "other-model/0000"
    with pytest.raises(ModelMismatchError, match="tiny-random"):
        Retriever(filled, "images", other)


def test_retriever_loads_the_collection_model_by_default(filled, tiny_model):
    r = Retriever(filled, "images")
    assert r.model.fingerprint == tiny_model.fingerprint
