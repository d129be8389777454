"""Vector stores: embedded Qdrant Edge (default) or qdrant-client (a server, or local ``:memory:``).

qdrant-client is imported only when a ClientStore is asked for: it takes seconds to import, and the
embedded path does not need it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edje_qdrant.errors import StoreError
from edje_qdrant.store.base import CollectionSpec, Hit, PointRecord, Store
from edje_qdrant.store.edge import EdgeStore
from edje_qdrant.store.filters import ALLOWED_KEYS as FILTER_KEYS

if TYPE_CHECKING:
    from edje_qdrant.store.server import ClientStore, CollectionOptions

DEFAULT_PATH = "./edje-data"

__all__ = [
    "ClientStore",
    "CollectionSpec",
    "DEFAULT_PATH",
    "EdgeStore",
    "FILTER_KEYS",
    "Hit",
    "PointRecord",
    "Store",
    "open_store",
]


def __getattr__(name: str) -> Any:
    if name == "ClientStore":
        from edje_qdrant.store.server import ClientStore

        return ClientStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(path: str | None = None, url: str | None = None, api_key: str | None = None, *,
               create: bool = True, collection_options: "CollectionOptions | None" = None) -> Store:
    """``url`` -> a Qdrant server over gRPC; ``url=":memory:"`` -> qdrant-client local mode; else Edge at ``path``.

    ``create=False``: an embedded store must already exist (read-only commands create no folder or lock file).
    ``collection_options`` (shards, replicas, on-disk parts) lay out new collections on a server.
    """
    if not url:
        if collection_options is not None and not collection_options.is_default():
            from edje_qdrant.errors import InputError

            raise InputError("shards, replication and on-disk options apply to a Qdrant server: pass --url "
                             "(QDRANT_URL); the embedded store is one local shard")
        return EdgeStore(path or DEFAULT_PATH, create=create)
    from qdrant_client import QdrantClient

    from edje_qdrant.store.server import ClientStore, _strip_credentials

    if url == ":memory:":
        return ClientStore(QdrantClient(location=":memory:"), collection_options=collection_options)
    try:
        # no version probe at construction: it warns on every unreachable URL, and ClientStore reports a server
        # that does not answer with its own clear error on first use
        client = QdrantClient(url=url, api_key=api_key, prefer_grpc=True, check_compatibility=False)
    except Exception as e:  # bad URL syntax and the like; never echo the key
        raise StoreError(f"cannot use Qdrant URL {_strip_credentials(url)!r}: {type(e).__name__}") from e
    return ClientStore(client, url=url, collection_options=collection_options)
