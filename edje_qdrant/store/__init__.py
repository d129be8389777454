"""Vector stores: embedded Qdrant Edge (default) or qdrant-client (a server, or local ``:memory:``).

qdrant-client is imported only when a ClientStore is asked for: it takes seconds to import, and the
embedded path does not need it.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from edje_qdrant.errors import InputError, StoreError
from edje_qdrant.store.checks import redact_url
from edje_qdrant.store.filters import FILTER_KEYS
from edje_qdrant.store.base import CollectionSpec, Hit, PointRecord, Store
from edje_qdrant.store.edge import EdgeStore

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
    "redact_url",
]


def __getattr__(name: str) -> Any:
    if name == "ClientStore":
        from edje_qdrant.store.server import ClientStore  # cost: qdrant-client takes seconds to import

        return ClientStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(path: Any = None, url: str | None = None, api_key: str | None = None, *,
               create: bool = True, collection_options: "CollectionOptions | None" = None) -> Store:
    """Every form a store can be named in, as a ``Store`` (``Retriever`` and ``ingest`` take the same forms):

    - ``path``: a folder for the embedded Qdrant Edge store (``create=False``: it must already exist, so
      read-only commands create no folder or lock file), or an open ``qdrant_client.QdrantClient``, or a Store;
    - ``url``: a Qdrant server over gRPC (``api_key``), or ``":memory:"`` for qdrant-client's local mode.

    ``collection_options`` (shards, replicas, on-disk parts) lay out new collections on a server.
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        if url:
            raise InputError("pass either an open store/client or a url, not both")
        return _from_object(path)
    if not url:
        if collection_options is not None and not collection_options.is_default():
            raise InputError("shards, replication and on-disk options apply to a Qdrant server: pass --url "
                             "(QDRANT_URL); the embedded store is one local shard")
        return EdgeStore(os.fspath(path) if path is not None else DEFAULT_PATH, create=create)
    from qdrant_client import QdrantClient  # cost: as above, only for a server or local mode

    from edje_qdrant.store.server import ClientStore  # cost: qdrant-client takes seconds to import

    if url == ":memory:":
        return ClientStore(QdrantClient(location=":memory:"), collection_options=collection_options)
    try:
        # no version probe at construction: it warns on every unreachable URL, and ClientStore reports a server
        # that does not answer with its own clear error on first use
        client = QdrantClient(url=url, api_key=api_key, prefer_grpc=True, check_compatibility=False)
    except Exception as e:  # bad URL syntax and the like; never echo the key
        raise StoreError(f"cannot use Qdrant URL {redact_url(url)!r}: {type(e).__name__}") from e
    return ClientStore(client, url=url, collection_options=collection_options)


def _from_object(obj: Any) -> Store:
    """An open QdrantClient (wrapped) or anything that already speaks the Store protocol."""
    client_module = sys.modules.get("qdrant_client")  # not imported yet: obj cannot be a client (import is slow)
    if client_module is not None and isinstance(obj, client_module.QdrantClient):
        from edje_qdrant.store.server import ClientStore  # cost: qdrant-client takes seconds to import

        return ClientStore(obj)
    if hasattr(obj, "query") and hasattr(obj, "open_collection"):
        return obj
    raise InputError(f"store must be a folder path, a QdrantClient or a Store, got {type(obj).__name__}")
