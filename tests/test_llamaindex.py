"""LlamaIndex adapters on a real Qdrant Edge collection built by ingest (tiny-random model)."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core", reason="optional extra: pip install 'edje-qdrant[llamaindex]'")

from llama_index.core.schema import ImageNode, NodeWithScore, TextNode  # noqa: E402

from edje_qdrant.errors import InputError  # noqa: E402
from edje_qdrant.ingestion import ingest  # noqa: E402
from edje_qdrant.integrations.llamaindex import EDJERetriever, EDJEReranker  # noqa: E402
from edje_qdrant.retriever import Retriever  # noqa: E402
from edje_qdrant.store import open_store  # noqa: E402


@pytest.fixture(scope="module")
def edje(tmp_path_factory, demo_folder, tiny_model):
    store = open_store(path=str(tmp_path_factory.mktemp("llama") / "store"))
    assert ingest(demo_folder, store, tiny_model, "images").ingested == 12
    yield Retriever(store, "images", tiny_model)
    store.close()


@pytest.mark.parametrize("query", ["a red circle", "a green triangle"])
def test_retrieve_returns_image_nodes_like_search(edje, query):
    expected = edje.search(query, k=4, rerank_k=12)
    nodes = EDJERetriever(edje, k=4, rerank_k=12).retrieve(query)
    assert [n.node.node_id for n in nodes] == [r.id for r in expected]
    for n, r in zip(nodes, expected):
        assert isinstance(n, NodeWithScore) and isinstance(n.node, ImageNode)
        assert n.node.image_path == r.path and n.score == pytest.approx(r.score)
        assert n.node.text == r.page_content and n.node.metadata["rerank_score"] == pytest.approx(r.rerank_score)
        assert n.node.metadata["first_stage_score"] == pytest.approx(r.first_stage_score)
        assert n.node.image_mimetype == r.metadata["mime"]
        # what an LLM reads: the caption and image facts, not the ranking numbers
        llm_text = n.node.get_content(metadata_mode="llm")
        assert r.page_content in llm_text and "rerank_score" not in llm_text


def test_filter_and_async_retrieve(edje):
    r = EDJERetriever(edje, k=3, rerank_k=12, filter={"folder": "triangle"})
    nodes = asyncio.run(r.aretrieve("a red circle"))
    assert len(nodes) == 3 and all(n.node.metadata["folder"] == "triangle" for n in nodes)
    assert [n.node.node_id for n in nodes] == [n.node.node_id for n in r.retrieve("a red circle")]


@pytest.mark.parametrize("query", ["a blue square", "a yellow circle"])
def test_postprocessor_reranks_first_stage_nodes_like_search(edje, query):
    first_stage = EDJERetriever(edje, k=10, rerank_k=0).retrieve(query)
    assert all(n.node.metadata["rerank_score"] is None for n in first_stage)
    out = EDJEReranker(retriever=edje, top_n=3).postprocess_nodes(first_stage, query_str=query)
    expected = edje.search(query, k=3, rerank_k=10)
    assert [n.node.node_id for n in out] == [r.id for r in expected]
    assert [n.score for n in out] == pytest.approx([r.rerank_score for r in expected])


def test_postprocessor_keeps_foreign_nodes_last_and_needs_a_query(edje):
    nodes = EDJERetriever(edje, k=4, rerank_k=0).retrieve("a red square")
    stranger = NodeWithScore(node=TextNode(id_="00000000-0000-5000-8000-000000000001", text="elsewhere"), score=0.9)
    out = EDJEReranker(retriever=edje).postprocess_nodes([stranger, *nodes], query_str="a red square")
    assert len(out) == 5 and out[-1] is stranger
    assert [n.node.node_id for n in out[:4]] == [r.id for r in edje.search("a red square", k=4, rerank_k=4)]
    with pytest.raises(InputError, match="query"):
        EDJEReranker(retriever=edje).postprocess_nodes(nodes)
