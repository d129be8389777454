"""What the service's routes share: its limits, the Retriever (built on first use), the images of its collection,
and results as the API returns them."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fastapi import HTTPException, Request

from edje_qdrant.errors import EdjeError
from edje_qdrant.point_images import PointImages
from edje_qdrant.retriever import Retriever, SearchResult
from edje_qdrant.search_args import QueryLimits
from edje_qdrant.service_auth import Access

__all__ = ["ServiceLimits", "RetrieverHolder", "ResultsOut", "get_retriever"]

log = logging.getLogger("edje_qdrant.service")


@dataclass(frozen=True)
class ServiceLimits(QueryLimits):
    """Caps on what one request may ask for (tighter than the library's; the OpenAPI schema states them)."""

    max_k: int = 100
    max_rerank_k: int = 1000
    max_query_chars: int = 2000
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 20 * 1024 * 1024  # a photo sent to POST /search/image


class RetrieverHolder:
    """A Retriever given directly, or built on first use (and rebuilt until it succeeds, e.g. before ingest)."""

    def __init__(self, source: Retriever | Callable[[], Retriever]) -> None:
        self._given = not callable(source) or isinstance(source, Retriever)
        self._source = source
        self._retriever: Retriever | None = source if self._given else None  # type: ignore[assignment]
        self._lock = threading.Lock()
        self._images: PointImages | None = None

    def get(self) -> Retriever:
        if self._retriever is not None:
            return self._retriever
        with self._lock:
            if self._retriever is None:
                self._retriever = self._source()  # type: ignore[operator]
                log.info("retriever ready on collection %r", self._retriever.collection)
            return self._retriever

    def images(self) -> PointImages:
        """Originals and thumbnails of the retriever's collection (one cache for the service's life)."""
        r = self.get()
        with self._lock:
            if self._images is None:
                self._images = PointImages(r.store, r.collection)
            return self._images

    def close(self) -> None:
        """Close a retriever this holder built (one given to it belongs to the caller)."""
        if not self._given and self._retriever is not None:
            self._retriever.close()


class ResultsOut:
    """Results as the API returns them: the SearchResult fields plus image URLs (signed when keys are set)."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def __call__(self, results: Sequence[SearchResult], request: Request) -> list[dict[str, Any]]:
        root = request.scope.get("root_path", "")
        out = []
        for result in results:
            signed = self.access.url_params(result.id)
            query = "?" + "&".join(f"{k}={v}" for k, v in signed.items()) if signed else ""
            out.append({**result.to_dict(), "thumbnail_url": f"{root}/points/{result.id}/thumbnail{query}",
                        "image_url": f"{root}/points/{result.id}/image{query}"})
        return out


def get_retriever(holder: RetrieverHolder) -> Retriever:
    try:
        return holder.get()
    except EdjeError as exc:
        log.warning("retriever not ready: %s", exc)
        raise HTTPException(503, str(exc)) from None
