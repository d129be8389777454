"""LangChain adapters: a retriever, a re-ranking document compressor and query embeddings.

Install with ``pip install 'edje-qdrant[langchain]'`` (from a checkout: ``pip install -e ".[langchain]"``).

- ``EDJERetriever``: ``invoke(query, k=..., rerank_k=..., filter=...)`` -> Documents, best first.
- ``EDJEReranker``: re-ranks Documents that another retriever found in the same collection (for instance
  langchain-qdrant's ``QdrantVectorStore`` with ``vector_name="clip"``), by their point ids; usable as the
  ``base_compressor`` of a ``ContextualCompressionRetriever``.
- ``EDJETextEmbeddings``: the model's text tower as LangChain ``Embeddings``, so ``QdrantVectorStore`` can
  search the ``clip`` vector of a collection built by ``edje-qdrant ingest``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, Sequence

from edje_qdrant.integrations import require

require("langchain_core", "langchain")

from langchain_core.callbacks import (  # noqa: E402
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from pydantic import ConfigDict, Field  # noqa: E402

from edje_qdrant.errors import InputError  # noqa: E402
from edje_qdrant.integrations import canonical_id, rerank_point_ids, result_metadata, score_metadata  # noqa: E402
from edje_qdrant.retriever import Retriever, SearchResult  # noqa: E402
from edje_qdrant.schema import METADATA_KEY  # noqa: E402

__all__ = ["EDJERetriever", "EDJEReranker", "EDJETextEmbeddings", "result_to_document"]

log = logging.getLogger(__name__)

# where a Document may carry its point id: Document.id, then these metadata keys (langchain-qdrant uses `_id`)
ID_KEYS = ("point_id", "_id", "id")


def result_to_document(result: SearchResult) -> Document:
    """One SearchResult as a Document: caption (or file name) as text, scores and image metadata as metadata."""
    return Document(id=result.id, page_content=result.page_content, metadata=result_metadata(result))


class EDJERetriever(BaseRetriever):
    """LangChain retriever over ``Retriever.search``: ANN on ``clip`` then EDJE re-ranking.

    ``k``, ``rerank_k`` and ``filter`` are defaults; each can be overridden per call:
    ``retriever.invoke("a dog", k=3, filter={"folder": "holidays"})``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Retriever
    k: int = 4
    rerank_k: int = 100
    filter: Any = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: Optional[int] = None, rerank_k: Optional[int] = None, filter: Any = None
                                ) -> list[Document]:
        results = self.retriever.search(
            query,
            k=self.k if k is None else k,
            rerank_k=self.rerank_k if rerank_k is None else rerank_k,
            filter=self.filter if filter is None else filter,
        )
        return [result_to_document(r) for r in results]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: Optional[int] = None, rerank_k: Optional[int] = None, filter: Any = None
                                       ) -> list[Document]:
        # The model runs on CPU/GPU outside the event loop; the Retriever is thread-safe.
        return await asyncio.to_thread(
            self._get_relevant_documents,
            query,
            run_manager=run_manager.get_sync(),
            k=k,
            rerank_k=rerank_k,
            filter=filter,
        )


class EDJEReranker(BaseDocumentCompressor):
    """Re-ranks Documents of the same collection by point id; writes the scores in their metadata:
    ``relevance_score`` and ``score`` (what the output is sorted by), ``first_stage_score`` (the cosine, 0 when
    the documents carry none) and ``rerank_score`` (the joint encoder's logit); see ``edje_qdrant.scores``.

    ``top_n`` keeps the best n (None keeps all). Documents whose point is not in the collection are kept after
    the re-ranked ones, unchanged apart from ``relevance_score = None`` (a warning names them).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    retriever: Retriever
    top_n: Optional[int] = Field(default=None, ge=1)

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        docs = list(documents)
        ids = [_point_id(d, i) for i, d in enumerate(docs)]
        results, missing = rerank_point_ids(self.retriever, query, ids)
        doc_by_id: dict[str, Document] = {}
        for pid, d in zip(ids, docs):
            doc_by_id.setdefault(canonical_id(pid), d)
        out = [_with_scores(doc_by_id[r.id], r) for r in results]
        if missing:
            log.warning(
                "%d document(s) are not in collection %r and were not re-ranked: %s",
                len(missing), self.retriever.collection, ", ".join(str(ids[i]) for i in missing),
            )
            for i in missing:
                out.append(docs[i].model_copy(update={METADATA_KEY: {**docs[i].metadata, "relevance_score": None}}))
        return out[: self.top_n] if self.top_n else out

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        return await asyncio.to_thread(self.compress_documents, documents, query, callbacks)


class EDJETextEmbeddings(Embeddings):
    """The model's text tower as LangChain Embeddings (queries and texts land in the ``clip`` image space)."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever

    def embed_query(self, text: str) -> list[float]:
        return [float(x) for x in self.retriever.model.embed_query(text)]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.embed_query(t) for t in texts]


def _point_id(doc: Document, position: int) -> str:
    if doc.id:
        return str(doc.id)
    for key in ID_KEYS:
        if doc.metadata.get(key):
            return str(doc.metadata[key])
    raise InputError(
        f"document {position} has no point id (Document.id or metadata 'point_id'/'_id'); EDJEReranker only "
        "re-ranks documents that come from the same Qdrant collection"
    )


def _with_scores(doc: Document, r: SearchResult) -> Document:
    # relevance_score is LangChain's name for what the list is sorted by: our ``score``
    meta = {**doc.metadata, "relevance_score": r.score, **score_metadata(r)}
    return doc.model_copy(update={METADATA_KEY: meta})  # our payload layout uses LangChain's field names
