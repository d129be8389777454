"""ClientStore on a real Qdrant server (QDRANT_URL, else a testcontainers server when Docker answers, else skipped),
and the retry-then-clear-error path against a closed port (always runs: it needs no server)."""
from __future__ import annotations

import logging
import socket
import time
import uuid
import warnings

import pytest
from conftest_store import (
    DIM,
    SPEC,
    check_filters,
    check_query_order_and_payload,
    check_scroll_update_delete,
    check_retrieve_existing_count_reupsert,
    check_spec_create_and_verify,
    check_threads,
    filled,
    make_points,
)
from qdrant_client import QdrantClient

from edje_qdrant.errors import StoreError
from edje_qdrant.store import ClientStore

pytestmark = pytest.mark.server


@pytest.fixture
def remote(server):
    """A ClientStore plus a unique collection prefix; the test's collections are dropped afterwards."""
    client, url = server
    prefix = f"edjetest-{uuid.uuid4().hex[:8]}-"
    store = ClientStore(client, url=url)
    yield store, prefix
    for c in client.get_collections().collections:
        if c.name.startswith(prefix):
            client.delete_collection(c.name)


def test_spec_create_and_verify(remote):
    store, prefix = remote
    check_spec_create_and_verify(store, prefix=prefix)
    assert store.client.get_collection(prefix + "specs").config.metadata == {"edje": SPEC.to_dict()}


def test_query_order_and_payload_selection(remote):
    check_query_order_and_payload(remote[0], prefix=remote[1])


def test_retrieve_existing_count_and_reupsert(remote):
    check_retrieve_existing_count_reupsert(remote[0], prefix=remote[1])


def test_scroll_update_payloads_delete(remote):
    check_scroll_update_delete(remote[0], prefix=remote[1])


def test_eight_threads_match_sequential(remote):
    check_threads(remote[0], prefix=remote[1])


def test_filters(remote):
    check_filters(remote[0], prefix=remote[1])


def test_large_upsert_in_batches(remote):
    store, prefix = remote
    filled(store, prefix + "big", points=make_points(150))  # ~10 MB of token payloads, several gRPC batches
    assert store.count(prefix + "big") == 150


# --------------------------------------------------------------------------- no server


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("grpc", [True, False], ids=["grpc", "rest"])
def test_connection_refused_retries_then_clear_error(grpc, caplog):
    port = _closed_port()
    url = f"http://127.0.0.1:{port}"
    key = "very-secret-key-123"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # insecure api key / version check warnings from qdrant-client
        client = QdrantClient(url=url, grpc_port=port, api_key=key, prefer_grpc=grpc, timeout=5,
                              check_compatibility=False)
        store = ClientStore(client, url=url, retries=3, backoff_s=0.05)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="edje_qdrant"):
            with pytest.raises(StoreError) as err:
                store.open_collection("photos", SPEC)
    elapsed = time.monotonic() - started
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "unreachable" in msg and "failed 3 times" in msg
    assert "--url" in msg and "QDRANT_URL" in msg
    assert key not in msg and key not in caplog.text
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2  # 3 attempts: 2 retries, backoff 0.05 s then 0.1 s
    assert elapsed >= 0.15
    store.close()


def test_query_on_unreachable_server_names_the_url_not_the_key():
    port = _closed_port()
    url = f"http://127.0.0.1:{port}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = QdrantClient(url=url, grpc_port=port, api_key="k-456-secret", prefer_grpc=True,
                              check_compatibility=False)
        store = ClientStore(client, url=url, retries=2, backoff_s=0.01)
        with pytest.raises(StoreError, match=rf"Qdrant at http://127.0.0.1:{port} is unreachable") as err:
            store.query("photos", [1.0] * DIM, 3, None)
    assert "k-456-secret" not in str(err.value)
