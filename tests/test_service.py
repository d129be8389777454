"""HTTP service through the ASGI test client (real Retriever, Qdrant Edge store, tiny-random model), plus one
real `serve` process on a local port."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="optional extra: pip install 'edje-qdrant[service]'")
httpx = pytest.importorskip("httpx", reason="the ASGI test client needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from edje_qdrant.errors import StoreError  # noqa: E402
from edje_qdrant.ingestion import ingest  # noqa: E402
from edje_qdrant.retriever import Retriever  # noqa: E402
from edje_qdrant.service import ServiceLimits, create_app  # noqa: E402
from edje_qdrant.store import open_store  # noqa: E402

LIMITS = ServiceLimits(max_k=20, max_rerank_k=50, max_query_chars=200, max_body_bytes=4096)


@pytest.fixture(scope="module")
def edje(tmp_path_factory, demo_folder, tiny_model):
    store = open_store(path=str(tmp_path_factory.mktemp("service") / "store"))
    assert ingest(demo_folder, store, tiny_model, "images").ingested == 12
    yield Retriever(store, "images", tiny_model)
    store.close()


@pytest.fixture()
def client(edje):
    with TestClient(create_app(edje, limits=LIMITS)) as c:
        yield c


@pytest.mark.parametrize("query", ["a red circle", "a green triangle", "a blue square"])
def test_search_returns_the_same_results_as_retriever(client, edje, query):
    res = client.post("/search", json={"query": query, "k": 5, "rerank_k": 12})
    assert res.status_code == 200, res.text
    body = res.json()
    expected = edje.search(query, k=5, rerank_k=12)
    assert [h["id"] for h in body["results"]] == [r.id for r in expected]
    assert [h["score"] for h in body["results"]] == pytest.approx([r.score for r in expected])
    first = body["results"][0]
    assert first["path"] == expected[0].path and first["metadata"]["sha256"] == expected[0].metadata["sha256"]
    assert isinstance(first["first_stage_score"], float) and isinstance(first["rerank_score"], float)
    assert body["query"] == query and body["k"] == 5 and body["rerank_k"] == 12 and body["took_ms"] > 0


def test_defaults_and_filters(client, edje):
    body = client.post("/search", json={"query": "a red circle", "rerank_k": 12}).json()
    assert len(body["results"]) == 10 and body["k"] == 10
    small = client.post("/search", json={"query": "a red circle", "k": 3, "rerank_k": 12,
                                         "filter": {"folder": "square"}}).json()["results"]
    assert [h["id"] for h in small] == [r.id for r in edje.search("a red circle", 3, 12, {"folder": "square"})]
    qdrant_json = {"must": [{"key": "metadata.folder", "match": {"any": ["circle", "triangle"]}}]}
    hits = client.post("/search", json={"query": "a red circle", "k": 8, "rerank_k": 12,
                                        "filter": qdrant_json}).json()["results"]
    assert len(hits) == 8 and {h["metadata"]["folder"] for h in hits} == {"circle", "triangle"}


@pytest.mark.parametrize(
    "body, status, field, fragment",
    [
        ({"k": 3}, 422, "query", "Field required"),
        ({"query": "x", "k": "3"}, 422, "k", "valid integer"),
        ({"query": "x", "k": True}, 422, "k", "valid integer"),
        ({"query": "x", "k": 0}, 422, "k", "greater than or equal to 1"),
        ({"query": "x", "rerank_k": -1}, 422, "rerank_k", "greater than or equal to 0"),
        ({"query": "x", "top_k": 3}, 422, "top_k", "Extra inputs"),
        ({"query": "x", "k": 21, "rerank_k": 30}, 422, "k", "limit of 20"),
        ({"query": "x", "k": 5, "rerank_k": 51}, 422, "rerank_k", "limit of 50"),
        ({"query": "x" * 201}, 422, "query", "limit is 200"),
        ({"query": "  "}, 422, "query", "empty"),
        ({"query": "x", "k": 20, "rerank_k": 10}, 422, "k", "larger than rerank_k"),
        ({"query": 7}, 422, "query", "valid string"),
    ],
)
def test_bad_requests_get_clear_4xx(client, body, status, field, fragment):
    res = client.post("/search", json=body)
    assert res.status_code == status, res.text
    problems = res.json()["detail"]
    assert any(p["field"] == field and fragment in p["message"] for p in problems), problems


def test_bad_filters_and_bad_json_are_4xx(client):
    # the schema states both filter forms, so a bad filter is a 422 naming the filter's field
    res = client.post("/search", json={"query": "x", "rerank_k": 12, "filter": {"colour": "red"}})
    assert res.status_code == 422 and any(p["field"].startswith("filter.") and p["field"].endswith("colour")
                                          and "Extra inputs" in p["message"] for p in res.json()["detail"])
    res = client.post("/search", json={"query": "x", "rerank_k": 12, "filter": {"taken_after": "last week"}})
    assert res.status_code == 422 and any("taken_after" in p["field"] and "date" in p["message"]
                                          for p in res.json()["detail"])
    res = client.post("/search", json={"query": "x", "rerank_k": 12, "filter": {"must": [{"key": 3}]}})
    assert res.status_code == 422 and any("must" in p["field"] for p in res.json()["detail"])
    res = client.post("/search", content=b'{"query": "x",', headers={"content-type": "application/json"})
    assert res.status_code == 422 and "JSON" in res.text


def test_request_size_is_capped(client):
    big = json.dumps({"query": "x", "filter": {"folder": "y" * 5000}})
    res = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert res.status_code == 413 and "4096 bytes" in res.json()["detail"]

    def chunks():  # no Content-Length: the streamed body is counted
        for _ in range(10):
            yield b" " * 1000

    res = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert res.status_code == 413


def test_healthz_and_openapi(client):
    res = client.get("/healthz")
    assert res.status_code == 200
    health = res.json()
    assert (health["status"], health["collection"], health["model"], health["points"]) == ("ok", "images",
                                                                                          "tiny-random", 12)
    spec = client.get("/openapi.json").json()
    search = spec["paths"]["/search"]["post"]
    ref = search["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(spec["components"]["schemas"][ref]["properties"]) == {"query", "k", "rerank_k", "filter"}
    assert {"200", "422", "413"} <= set(search["responses"])


def test_metrics_count_requests_and_time_each_stage(client):
    for q in ("a red circle", "a blue square"):
        assert client.post("/search", json={"query": q, "k": 2, "rerank_k": 12}).status_code == 200
    client.post("/search", json={"query": "x", "k": 0})
    text = client.get("/metrics").text
    assert 'edje_http_requests_total{method="POST",route="/search",status="200"} 2' in text
    assert 'edje_http_requests_total{method="POST",route="/search",status="422"} 1' in text
    assert "# TYPE edje_search_stage_seconds histogram" in text
    assert 'edje_search_stage_seconds_count{stage="request"} 3' in text  # every /search call, 4xx included
    for stage in ("total", "embed_query", "ann_fetch", "decode", "rerank"):  # searches that ran
        assert f'edje_search_stage_seconds_count{{stage="{stage}"}} 2' in text, stage
        assert f'edje_search_stage_seconds_bucket{{stage="{stage}",le="+Inf"}} 2' in text


def test_service_api_key(edje, caplog):
    secret = "svc-key-3141592653"
    with caplog.at_level("DEBUG"), TestClient(create_app(edje, limits=LIMITS, api_keys=[secret])) as c:
        assert c.post("/search", json={"query": "a red circle", "k": 2, "rerank_k": 12}).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert c.post("/search", json={"query": "a", "k": 2, "rerank_k": 12}, headers=wrong).status_code == 401
        for headers in ({"Authorization": f"Bearer {secret}"}, {"X-API-Key": secret}):
            assert c.post("/search", json={"query": "a", "k": 2, "rerank_k": 12}, headers=headers).status_code == 200
        assert c.get("/healthz").status_code == 200  # health stays open for container checks
        assert secret not in c.get("/metrics").text
    assert secret not in caplog.text


def test_lazy_retriever_reports_503_until_the_collection_exists(tmp_path, demo_folder, tiny_model):
    path = str(tmp_path / "store")
    store = open_store(path=path)

    def factory():
        return Retriever(store, "images", tiny_model)

    with pytest.raises(StoreError):
        factory()
    with TestClient(create_app(factory, limits=LIMITS)) as c:
        res = c.get("/healthz")
        assert res.status_code == 503 and "does not exist" in res.json()["detail"]
        assert c.post("/search", json={"query": "x", "k": 1, "rerank_k": 12}).status_code == 503
        ingest(demo_folder, store, tiny_model, "images")
        assert c.get("/healthz").json()["points"] == 12
        assert len(c.post("/search", json={"query": "x", "k": 2, "rerank_k": 12}).json()["results"]) == 2
    store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_runs_a_real_server(tmp_path, demo_folder, tiny_model):
    """`serve` binds 127.0.0.1 by default, answers /search like the Retriever, and never prints API keys."""
    path = str(tmp_path / "store")
    store = open_store(path=path)
    ingest(demo_folder, store, tiny_model, "images")
    expected = [r.id for r in Retriever(store, "images", tiny_model).search("a red circle", k=3, rerank_k=12)]
    store.close()
    port = _free_port()
    env = dict(os.environ, QDRANT_API_KEY="qdrant-key-2718281828", EDJE_SERVICE_API_KEY="svc-key-1618033988",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edje_qdrant.cli.serve", "--store", path, "--port", str(port), "--max-k", "5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail("serve did not answer /healthz within 120 s")
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/search"
        body = {"query": "a red circle", "k": 3, "rerank_k": 12}
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        res = httpx.post(url, json=body, headers={"X-API-Key": "svc-key-1618033988"}, timeout=30)
        assert [h["id"] for h in res.json()["results"]] == expected
        too_many = httpx.post(url, json=dict(body, k=6), headers={"X-API-Key": "svc-key-1618033988"}, timeout=30)
        assert too_many.status_code == 422 and "limit of 5" in too_many.text
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)  # the search page needs no key: it asks for it
        assert page.status_code == 200 and 'type="search"' in page.text
    finally:
        proc.terminate()
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert f"on http://127.0.0.1:{port}" in output
    assert f"search page: http://127.0.0.1:{port}/" in output
    assert "qdrant-key-2718281828" not in output and "svc-key-1618033988" not in output


def test_redact_url():
    from edje_qdrant.store import redact_url

    assert redact_url("https://user:pw@qdrant.example:6333/x?api_key=abc") == "https://qdrant.example:6333/x"
    assert redact_url("http://qdrant:6333") == "http://qdrant:6333"
