"""Adapters for LangChain and LlamaIndex (optional extras, imported lazily by their own modules).

This package itself imports neither framework; it holds what both adapters share: re-ranking points named by
id (documents or nodes that came from another retriever on the same collection) and a flat metadata dict for a
result.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Sequence

from edje_qdrant.errors import install_hint
from edje_qdrant.schema import SOURCE_KEY, canonical_id

if TYPE_CHECKING:  # pragma: no cover
    from edje_qdrant.retriever import Retriever, SearchResult

__all__ = ["canonical_id", "rerank_point_ids", "result_metadata", "require", "score_metadata"]

def require(module: str, extra: str) -> None:
    """Import check with the fix in the message (the PyPI and the from-a-checkout install command)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed; install the optional extra `{extra}` with: {install_hint(extra)}"
        ) from exc


def result_metadata(result: "SearchResult") -> dict[str, Any]:
    """Image metadata (flat, as stored) plus point id, source path and the three scores (``edje_qdrant.scores``)."""
    return {**result.metadata, SOURCE_KEY: result.path, **score_metadata(result)}


def score_metadata(result: "SearchResult") -> dict[str, Any]:
    """Point id, the three scores and, when re-ranking failed, the flags saying why (``edje_flags``)."""
    meta = {"point_id": result.id, "score": result.score, "first_stage_score": result.first_stage_score,
            "rerank_score": result.rerank_score}
    if result.flags:
        meta["edje_flags"] = list(result.flags)
    return meta


def rerank_point_ids(
    retriever: "Retriever",
    query: str,
    ids: Sequence[Any],
    first_stage_scores: Sequence[float | None] | None = None,
) -> tuple[list["SearchResult"], list[int]]:
    """Re-rank the stored points ``ids`` for ``query`` (see ``Retriever.rerank_ids``)."""
    return retriever.rerank_ids(query, ids, first_stage_scores)
