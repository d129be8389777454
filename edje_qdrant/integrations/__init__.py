"""Adapters for LangChain and LlamaIndex (optional extras, imported lazily by their own modules).

This package itself imports neither framework; it holds what both adapters share: re-ranking points named by
id (documents or nodes that came from another retriever on the same collection) and a flat metadata dict for a
result.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from edje_qdrant.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from edje_qdrant.retriever import Retriever, SearchResult

__all__ = ["canonical_id", "rerank_point_ids", "result_metadata", "require"]

# keys written next to the image metadata in a Document / node; image metadata never overrides them
SCORE_KEYS = ("point_id", "source", "score", "first_stage_score", "rerank_score")


def require(module: str, extra: str) -> None:
    """Import check with the fix in the message (``pip install 'edje-qdrant[extra]'``)."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed; install the optional extra with: pip install 'edje-qdrant[{extra}]'"
        ) from exc


def result_metadata(result: "SearchResult") -> dict[str, Any]:
    """Image metadata (flat, as stored) plus point id, source path and the three scores."""
    meta: dict[str, Any] = dict(result.metadata)
    meta.update(
        point_id=result.id,
        source=result.path,
        score=result.score,
        first_stage_score=result.first_stage_score,
        rerank_score=result.rerank_score,
    )
    if result.flags:
        meta["edje_flags"] = list(result.flags)
    return meta


def rerank_point_ids(
    retriever: "Retriever",
    query: str,
    ids: Sequence[Any],
    first_stage_scores: Sequence[float | None] | None = None,
) -> tuple[list["SearchResult"], list[int]]:
    """Re-rank the stored points ``ids`` for ``query`` with the retriever's joint encoder.

    Returns (results best first, positions in ``ids`` of the points not found in the collection); a repeated id
    is re-ranked once. Points whose
    token blob is bad keep their input slot and are flagged, exactly as in ``Retriever.search``.
    """
    from edje_qdrant.codec import TOKENS_KEY
    from edje_qdrant.retriever import RESULT_PAYLOAD_KEYS, SearchResult, check_search_args

    check_search_args(query, 1, 0)
    if first_stage_scores is not None and len(first_stage_scores) != len(ids):
        raise InputError(f"got {len(ids)} ids but {len(first_stage_scores)} first-stage scores")
    if not ids:
        return [], []
    hits = retriever.store.retrieve(retriever.collection, list(ids), [TOKENS_KEY, *RESULT_PAYLOAD_KEYS])
    by_id = {str(h.id): h for h in hits}
    results: list[SearchResult] = []
    blobs: list[Any] = []
    missing: list[int] = []
    seen: set[str] = set()
    for pos, raw in enumerate(ids):
        key = canonical_id(raw)
        hit = by_id.get(key)
        if hit is None:
            missing.append(pos)
            continue
        if key in seen:  # the same point twice (e.g. merged retrievers): re-ranked once, first slot kept
            continue
        seen.add(key)
        first = first_stage_scores[pos] if first_stage_scores is not None else None
        meta = dict(hit.payload.get("metadata") or {})
        results.append(
            SearchResult(
                id=key,
                path=meta.get("source"),
                score=float(first) if first is not None else 0.0,
                first_stage_score=float(first) if first is not None else 0.0,
                rerank_score=None,
                page_content=str(hit.payload.get("page_content", "")),
                metadata=meta,
            )
        )
        blobs.append(hit.payload.get(TOKENS_KEY))
    if results:
        # Shares the search path's decoding, bad-blob handling, model lock and ordering (private API of the
        # same package; proposed as a public ``Retriever.rerank_ids``).
        from edje_qdrant.retriever import _Clock

        retriever._rerank(query, results, blobs, _Clock(None))  # noqa: SLF001
    return results, missing


def canonical_id(point_id: Any) -> str:
    """The canonical UUID string of a point id, or InputError."""
    import uuid

    try:
        return str(uuid.UUID(str(point_id)))
    except (ValueError, TypeError, AttributeError):
        raise InputError(
            f"point id {point_id!r} is not a UUID string; only points of an edje-qdrant collection can be re-ranked"
        ) from None
