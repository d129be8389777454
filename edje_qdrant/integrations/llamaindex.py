"""LlamaIndex adapters: a retriever of ImageNodes and a node postprocessor that re-ranks by point id.

Install with ``pip install 'edje-qdrant[llamaindex]'`` (from a checkout: ``pip install -e ".[llamaindex]"``).

- ``EDJERetriever(retriever, k=4, rerank_k=100, filter=None)``: ``retrieve(query)`` -> ``NodeWithScore`` of
  ``ImageNode`` (``image_path`` = the file, ``text`` = caption or file name, ``id_`` = point id), best first.
- ``EDJEReranker(retriever=..., top_n=None)``: postprocessor re-ranking nodes of the same collection.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, List, Optional

from edje_qdrant.integrations import require

require("llama_index.core", "llamaindex")

from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle  # noqa: E402
from pydantic import Field  # noqa: E402

from edje_qdrant.errors import InputError  # noqa: E402
from edje_qdrant.integrations import canonical_id, rerank_point_ids, result_metadata  # noqa: E402
from edje_qdrant.retriever import Retriever, SearchResult  # noqa: E402
from edje_qdrant.schema import MIME_KEY, SHA256_KEY  # noqa: E402

__all__ = ["EDJERetriever", "EDJEReranker", "result_to_node"]

log = logging.getLogger(__name__)

# metadata that describes the ranking, not the image: kept out of what an LLM or an embedder reads
_SCORE_METADATA = ["point_id", "score", "first_stage_score", "rerank_score", "edje_flags", SHA256_KEY]


def result_to_node(result: SearchResult) -> NodeWithScore:
    """One SearchResult as a scored ImageNode."""
    node = ImageNode(
        id_=result.id,
        text=result.page_content,
        image_path=result.path,
        image_mimetype=result.metadata.get(MIME_KEY),
        metadata=result_metadata(result),
        excluded_llm_metadata_keys=list(_SCORE_METADATA),
        excluded_embed_metadata_keys=list(_SCORE_METADATA),
    )
    return NodeWithScore(node=node, score=result.score)


class EDJERetriever(BaseRetriever):
    """LlamaIndex retriever over ``Retriever.search`` (first stage on ``clip``, then EDJE re-ranking)."""

    def __init__(self, retriever: Retriever, k: int = 4, rerank_k: int = 100, filter: Any = None,
                 **kwargs: Any) -> None:
        self.retriever = retriever
        self.k = k
        self.rerank_k = rerank_k
        self.filter = filter
        super().__init__(**kwargs)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        results = self.retriever.search(query_bundle.query_str, k=self.k, rerank_k=self.rerank_k, filter=self.filter)
        return [result_to_node(r) for r in results]

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


class EDJEReranker(BaseNodePostprocessor):
    """Re-ranks nodes of the same collection by point id (node id or metadata ``point_id``).

    The node's score becomes ``score`` (what the output is sorted by: rerank logit + the model's fusion weight x
    the node's incoming score as first-stage score); metadata gets ``score``, ``first_stage_score`` and
    ``rerank_score`` (see ``edje_qdrant.scores``). ``top_n`` keeps the best n (None keeps all); nodes whose point
    is not in the collection follow the re-ranked ones with their score unchanged.
    """

    retriever: Any = Field(description="an edje_qdrant Retriever on the collection the nodes come from")
    top_n: Optional[int] = Field(default=None, ge=1)

    @classmethod
    def class_name(cls) -> str:
        return "EDJEReranker"

    def _postprocess_nodes(
        self,
        nodes: List[NodeWithScore],
        query_bundle: Optional[QueryBundle] = None,
    ) -> List[NodeWithScore]:
        if query_bundle is None:
            raise InputError("EDJEReranker needs the query: call postprocess_nodes(nodes, query_str=...)")
        if not nodes:
            return []
        ids = [_point_id(n) for n in nodes]
        results, missing = rerank_point_ids(
            self.retriever, query_bundle.query_str, ids, [n.score for n in nodes]
        )
        by_id: dict[str, NodeWithScore] = {}
        for pid, n in zip(ids, nodes):
            by_id.setdefault(canonical_id(pid), n)
        out: List[NodeWithScore] = []
        for r in results:
            node = by_id[r.id].node
            node.metadata.update(score=r.score, first_stage_score=r.first_stage_score, rerank_score=r.rerank_score)
            if r.flags:
                node.metadata["edje_flags"] = list(r.flags)
            out.append(NodeWithScore(node=node, score=r.score))
        if missing:
            log.warning("%d node(s) are not in collection %r and were not re-ranked", len(missing),
                        self.retriever.collection)
            out.extend(nodes[i] for i in missing)
        return out[: self.top_n] if self.top_n else out


def _point_id(n: NodeWithScore) -> str:
    pid = n.node.metadata.get("point_id") or n.node.node_id
    if not pid:
        raise InputError("node has no point id (node id or metadata 'point_id'); re-rank nodes of the same collection")
    return str(pid)
