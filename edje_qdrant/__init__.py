"""edje-qdrant: EDJE vision-language re-ranking for image search in Qdrant (arXiv 2510.06820)."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Retriever", "SearchResult", "ingest", "load_model", "open_store", "__version__"]

_LAZY = {
    "Retriever": ("edje_qdrant.retriever", "Retriever"),
    "SearchResult": ("edje_qdrant.retriever", "SearchResult"),
    "ingest": ("edje_qdrant.ingestion", "ingest"),
    "load_model": ("edje_qdrant.models", "load_model"),
    "open_store": ("edje_qdrant.store", "open_store"),
}


def __getattr__(name: str) -> Any:  # lazy: `import edje_qdrant` stays cheap (no torch import)
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edje_qdrant' has no attribute {name!r}")
