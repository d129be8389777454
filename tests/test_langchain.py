"""LangChain adapters on a real qdrant-client :memory: collection built by ingest (tiny-random model)."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langchain_core", reason="optional extra: pip install 'edje-qdrant[langchain]'")
EXTRA = "optional extra: pip install 'edje-qdrant[langchain]'"
langchain_qdrant = pytest.importorskip("langchain_qdrant", reason=EXTRA)

from qdrant_client import QdrantClient, models  # noqa: E402

from edje_qdrant.errors import InputError  # noqa: E402
from edje_qdrant.ingestion import ingest  # noqa: E402
from edje_qdrant.integrations.langchain import EDJERetriever, EDJEReranker, EDJETextEmbeddings  # noqa: E402
from edje_qdrant.retriever import Retriever  # noqa: E402
from edje_qdrant.store.server import ClientStore  # noqa: E402

QUERIES = ["a red circle", "a blue square", "a yellow shape"]


@pytest.fixture(scope="module")
def client_and_retriever(demo_folder, tiny_model):
    client = QdrantClient(location=":memory:")
    store = ClientStore(client)
    report = ingest(demo_folder, store, tiny_model, "images")
    assert report.ingested == 12
    yield client, Retriever(store, "images", tiny_model)
    store.close()


@pytest.fixture(scope="module")
def edje(client_and_retriever):
    return client_and_retriever[1]


@pytest.fixture(scope="module")
def vectorstore(client_and_retriever):
    client, edje = client_and_retriever
    return langchain_qdrant.QdrantVectorStore(
        client=client, collection_name="images", embedding=EDJETextEmbeddings(edje), vector_name="clip"
    )


@pytest.mark.parametrize("query", QUERIES)
def test_invoke_returns_the_same_top_results_as_search(edje, query):
    expected = edje.search(query, k=4, rerank_k=12)
    docs = EDJERetriever(retriever=edje, k=4, rerank_k=12).invoke(query)
    assert [d.id for d in docs] == [r.id for r in expected]
    for d, r in zip(docs, expected):
        assert d.page_content == r.page_content and d.page_content.startswith("a ")
        m = d.metadata
        assert m["point_id"] == r.id and m["source"] == r.path
        assert m["score"] == pytest.approx(r.score) and m["rerank_score"] == pytest.approx(r.rerank_score)
        assert m["first_stage_score"] == pytest.approx(r.first_stage_score)
        assert m["sha256"] == r.metadata["sha256"] and m["width"] == 64 and m["mime"].startswith("image/")


def test_k_rerank_k_and_filter_per_call(edje):
    lc = EDJERetriever(retriever=edje, k=4, rerank_k=12)
    assert len(lc.invoke("a red circle", k=2)) == 2
    first_stage = lc.invoke("a red circle", rerank_k=0)
    assert all(d.metadata["rerank_score"] is None for d in first_stage)
    assert [d.id for d in first_stage] == [r.id for r in edje.search("a red circle", k=4, rerank_k=0)]
    circles = lc.invoke("a red circle", k=6, filter={"folder": "circle"})  # the folder holds 4 images
    assert len(circles) == 4 and all(d.metadata["folder"] == "circle" for d in circles)
    assert [d.id for d in circles] == [r.id for r in edje.search("a red circle", k=6, rerank_k=12,
                                                                      filter={"folder": "circle"})]
    # defaults are untouched by per-call values
    assert len(lc.invoke("a red circle")) == 4


def test_default_filter_and_qdrant_filter(edje):
    flt = models.Filter(must=[models.FieldCondition(key="metadata.folder", match=models.MatchValue(value="square"))])
    docs = EDJERetriever(retriever=edje, k=3, rerank_k=6, filter=flt).invoke("a red circle")
    assert len(docs) == 3 and all(d.metadata["folder"] == "square" for d in docs)


def test_ainvoke_matches_invoke(edje):
    lc = EDJERetriever(retriever=edje, k=3, rerank_k=12)

    async def both():
        return await asyncio.gather(lc.ainvoke("a blue square"), lc.ainvoke("a red circle", k=2))

    blue, red = asyncio.run(both())
    assert [d.id for d in blue] == [d.id for d in lc.invoke("a blue square")]
    assert [d.id for d in red] == [d.id for d in lc.invoke("a red circle", k=2)]


def test_bad_arguments_raise_input_error(edje):
    lc = EDJERetriever(retriever=edje, k=3, rerank_k=12)
    with pytest.raises(InputError, match="larger than rerank_k"):
        lc.invoke("a red circle", k=20)
    with pytest.raises(InputError, match="empty"):
        lc.invoke("   ")
    with pytest.raises(InputError, match="unknown filter key"):
        lc.invoke("a red circle", filter={"colour": "red"})


def test_payload_is_readable_by_langchain_qdrant(edje, vectorstore):
    """QdrantVectorStore reads page_content/metadata and searches `clip` in the same first-stage order."""
    docs = vectorstore.similarity_search("a red circle", k=12)
    expected = edje.search("a red circle", k=12, rerank_k=0)
    assert [d.metadata["_id"] for d in docs] == [r.id for r in expected]
    for d, r in zip(docs, expected):
        assert d.page_content == r.page_content
        assert d.metadata["source"] == r.path and d.metadata["sha256"] == r.metadata["sha256"]
        assert "edje_tokens" not in d.metadata
    scored = vectorstore.similarity_search_with_score("a red circle", k=3)
    assert [s for _, s in scored] == pytest.approx([r.first_stage_score for r in expected[:3]], abs=1e-5)


@pytest.mark.parametrize("query", QUERIES)
def test_reranker_in_contextual_compression_matches_search(edje, vectorstore, query):
    compression = pytest.importorskip("langchain_classic.retrievers",
                                      reason="ContextualCompressionRetriever lives in langchain-classic")
    pipeline = compression.ContextualCompressionRetriever(
        base_compressor=EDJEReranker(retriever=edje, top_n=3),
        base_retriever=vectorstore.as_retriever(search_kwargs={"k": 10}),
    )
    docs = pipeline.invoke(query)
    expected = edje.search(query, k=3, rerank_k=10)
    assert [d.metadata["_id"] for d in docs] == [r.id for r in expected]
    assert [d.metadata["relevance_score"] for d in docs] == pytest.approx([r.rerank_score for r in expected])


def test_reranker_keeps_unknown_points_last_and_dedupes(edje, vectorstore, caplog):
    from langchain_core.documents import Document

    docs = vectorstore.similarity_search("a green square", k=5)
    stranger = Document(id="00000000-0000-5000-8000-000000000000", page_content="not from this collection")
    with caplog.at_level("WARNING"):
        out = EDJEReranker(retriever=edje).compress_documents([stranger, *docs, docs[0]], "a green square")
    assert len(out) == 6 and out[-1].page_content == "not from this collection"
    assert out[-1].metadata["relevance_score"] is None and "00000000-0000-5000-8000-000000000000" in caplog.text
    expected = edje.search("a green square", k=5, rerank_k=5)
    assert [d.metadata["point_id"] for d in out[:5]] == [r.id for r in expected]


def test_reranker_rejects_documents_without_point_id(edje):
    from langchain_core.documents import Document

    with pytest.raises(InputError, match="no point id"):
        EDJEReranker(retriever=edje).compress_documents([Document(page_content="x")], "a red circle")
    with pytest.raises(InputError, match="not a UUID"):
        EDJEReranker(retriever=edje).compress_documents([Document(id="42", page_content="x")], "a red circle")


def test_async_reranker(edje, vectorstore):
    docs = vectorstore.similarity_search("a blue circle", k=8)
    out = asyncio.run(EDJEReranker(retriever=edje, top_n=2).acompress_documents(docs, "a blue circle"))
    assert [d.metadata["point_id"] for d in out] == [r.id for r in edje.search("a blue circle", k=2, rerank_k=8)]
