"""ClientStore on qdrant-client local mode (``:memory:`` and path), the reserved-point record, open_store."""
from __future__ import annotations

import logging

import grpc
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
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from edje_qdrant.errors import InputError, StoreError
from edje_qdrant.store import ClientStore, EdgeStore, open_store
from edje_qdrant.store import redact_url
from edje_qdrant.store.server import SPEC_POINT_ID, is_transient


@pytest.fixture(params=["metadata", "point"])
def store(request):
    """Both ways of keeping the model record: collection metadata and the reserved point."""
    s = ClientStore(QdrantClient(location=":memory:"), spec_record=request.param)
    yield s
    s.close()


def test_spec_create_and_verify(store):
    check_spec_create_and_verify(store)


def test_query_order_and_payload_selection(store):
    check_query_order_and_payload(store)


def test_retrieve_existing_count_and_reupsert(store):
    check_retrieve_existing_count_reupsert(store)


def test_scroll_update_payloads_delete(store):
    check_scroll_update_delete(store)


def test_eight_threads_match_sequential(store):
    check_threads(store)


def test_filters(store):
    check_filters(store)


def test_record_lives_in_collection_metadata():
    client = QdrantClient(location=":memory:")
    s = ClientStore(client)
    filled(s, points=make_points(3))
    assert client.get_collection("photos").config.metadata == {"edje": SPEC.to_dict()}
    assert client.count("photos", exact=True).count == 3  # no extra point
    vectors = client.get_collection("photos").config.params.vectors
    assert vectors["clip"].size == DIM and vectors["clip"].distance == models.Distance.COSINE


def test_reserved_point_never_shows_up():
    client = QdrantClient(location=":memory:")
    s = ClientStore(client, spec_record="point")
    pts = filled(s, points=make_points(5))
    assert client.count("photos", exact=True).count == 6  # the record is there ...
    assert s.count("photos") == 5  # ... but never counted,
    spec_vec = [1.0] + [0.0] * (DIM - 1)  # not even for a query on its own vector,
    assert SPEC_POINT_ID not in [h.id for h in s.query("photos", spec_vec, 10, None)]
    assert SPEC_POINT_ID not in [h.id for h in s.query("photos", spec_vec, 10, None, filter={"folder": "pets"})]
    assert s.retrieve("photos", [SPEC_POINT_ID, pts[0].id], []) != []
    assert [h.id for h in s.retrieve("photos", [SPEC_POINT_ID], None)] == []  # not by id,
    assert s.existing_ids("photos", [SPEC_POINT_ID, pts[1].id]) == {pts[1].id}
    with pytest.raises(InputError, match="reserved"):  # and cannot be overwritten.
        s.upsert("photos", [make_points(1)[0].__class__(SPEC_POINT_ID, [1.0] * DIM, {})])
    fresh = ClientStore(client)  # a new store on the same client finds the record in the point
    assert fresh.get_spec("photos") == SPEC and fresh.count("photos") == 5


def test_foreign_collection_is_refused():
    client = QdrantClient(location=":memory:")
    cosine = models.VectorParams(size=DIM, distance=models.Distance.COSINE)
    client.create_collection("theirs", vectors_config={"clip": cosine})
    client.create_collection("other", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.DOT))
    s = ClientStore(client)
    with pytest.raises(StoreError, match="'theirs'.*not created by edje-qdrant"):
        s.open_collection("theirs", SPEC)
    with pytest.raises(StoreError, match="no cosine vector named 'clip'"):
        s.get_spec("other")


def test_local_path_mode_persists(tmp_path):
    s = ClientStore(QdrantClient(path=str(tmp_path / "local")))
    pts = filled(s, points=make_points(6))
    s.close()
    s = ClientStore(QdrantClient(path=str(tmp_path / "local")))
    try:
        assert s.get_spec("photos") == SPEC
        assert s.count("photos") == 6
        assert s.existing_ids("photos", [p.id for p in pts]) == {p.id for p in pts}
        assert s.disk_usage("photos") is None
    finally:
        s.close()


def test_upsert_batches_by_count_and_bytes():
    client = QdrantClient(location=":memory:")
    calls = []
    real = client.upsert

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    client.upsert = counting  # observe the real call; the write still goes to local mode
    s = ClientStore(client, batch_size=4, batch_bytes=150_000)
    filled(s, points=make_points(10))
    assert calls == [2, 2, 2, 2, 2]  # ~66 kB of JSON per point: two fit under 150 kB
    assert s.count("photos") == 10


def test_open_store_picks_the_backend(tmp_path):
    mem = open_store(url=":memory:")
    assert isinstance(mem, ClientStore) and mem.local and mem.where == "local :memory:"
    mem.close()
    edge = open_store(path=str(tmp_path / "e"))
    assert isinstance(edge, EdgeStore) and edge.path == tmp_path / "e"
    edge.close()
    with pytest.warns(UserWarning, match="Api key is used with an insecure connection"):
        remote = open_store(url="http://user:pw@127.0.0.1:9/", api_key="k-123")
    assert isinstance(remote, ClientStore) and not remote.local
    assert remote.where == "http://127.0.0.1:9/" and remote.client.init_options["prefer_grpc"] is True
    remote.close()


def test_url_credentials_are_stripped():
    assert redact_url("https://me:secret@q.example.com:6333/p?api-key=x") == "https://q.example.com:6333/p"
    assert redact_url("http://localhost:6333") == "http://localhost:6333"


class _Rpc(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code


def test_which_errors_are_retried():
    assert is_transient(_Rpc(grpc.StatusCode.UNAVAILABLE))
    assert is_transient(_Rpc(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert not is_transient(_Rpc(grpc.StatusCode.INVALID_ARGUMENT))
    assert is_transient(ResponseHandlingException(ConnectionRefusedError(111, "refused")))
    assert is_transient(UnexpectedResponse(503, "busy", b"", {}))
    assert not is_transient(UnexpectedResponse(400, "bad", b"", {}))
    assert is_transient(TimeoutError())
    assert not is_transient(ValueError("wrong dim"))


def test_local_errors_are_not_retried(caplog):
    s = ClientStore(QdrantClient(location=":memory:"), retries=5, backoff_s=10)
    calls = []

    def flaky():
        calls.append(1)
        raise TimeoutError("local mode never times out for real")

    with caplog.at_level(logging.WARNING):
        with pytest.raises(StoreError, match="local :memory:: probing failed: local mode never times out"):
            s._call("probing", flaky)
    assert calls == [1] and "retry" not in caplog.text
