"""Schemathesis over every route of the HTTP service: every request the OpenAPI schema allows is answered as the
schema says (all checks: no server error, status codes and bodies conform, schema-valid requests are accepted,
invalid ones rejected), on a real Retriever with a Qdrant Edge store, the tiny-random model and real image files."""
from __future__ import annotations

import io

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="test extra: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="optional extra: pip install 'edje-qdrant[service]'")

from hypothesis import HealthCheck, settings  # noqa: E402

from edje_qdrant.ingestion import ingest  # noqa: E402
from edje_qdrant.retriever import Retriever  # noqa: E402
from edje_qdrant.store.filters import FILTER_KEYS  # noqa: E402
from edje_qdrant.service import ServiceLimits, create_app  # noqa: E402
from edje_qdrant.store import open_store  # noqa: E402

LIMITS = ServiceLimits(max_k=20, max_rerank_k=50, max_query_chars=200, max_body_bytes=64 * 1024)


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_folder, tiny_model):
    store = open_store(path=str(tmp_path_factory.mktemp("schemathesis") / "store"))
    assert ingest(demo_folder, store, tiny_model, "images").ingested == 12
    retriever = Retriever(store, "images", tiny_model)
    photos = sorted(p for p in demo_folder.rglob("*") if p.suffix in (".png", ".jpg"))
    yield create_app(retriever, limits=LIMITS), [r.id for r in retriever.search_image(photos[0], k=12,
                                                                                       exclude_self=False)], photos
    store.close()


@pytest.fixture(scope="module")
def app(served):
    return served[0]


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _breaks_k_rule(case) -> bool:
    """The one rule JSON Schema cannot state: k <= rerank_k when re-ranking (the field says so in words)."""
    body = case.body if isinstance(case.body, dict) else {}
    k, rerank_k = body.get("k", 10), body.get("rerank_k", LIMITS.max_rerank_k)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (k, rerank_k))
    return numbers and 0 < rerank_k < k


def _is_picture(data) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data if isinstance(data, bytes) else str(data).encode())) as im:
            im.load()
        return True
    except Exception:
        return False


ROUTES = [("/search", "positive"), ("/search", "negative"), ("/points/{point_id}/thumbnail", "positive"),
          ("/points/{point_id}/thumbnail", "negative"), ("/points/{point_id}/image", "positive"),
          ("/points/{point_id}/image", "negative"), ("/points/{point_id}/similar", "positive"),
          ("/points/{point_id}/similar", "negative"), ("/search/image", "positive"), ("/search/image", "negative"),
          ("/healthz", "positive"), ("/metrics", "positive")]  # the last two take no input to get wrong


@pytest.mark.parametrize("path, mode", ROUTES)
def test_every_request_is_answered_as_the_schema_says(api_schema, served, path, mode):
    """Generated requests (ids of stored points and real photos mixed in, so the 200 paths run too) are answered
    as the schema says: no 5xx, schema-valid requests accepted, invalid ones rejected."""
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import negative_data_rejection

    _, point_ids, photos = served
    operation = next(r.ok() for r in api_schema.get_all_operations() if r.ok().path == path)
    strategy = operation.as_strategy(GenerationMode(mode))
    calls = []

    @given(data=st.data())
    @settings(max_examples=150 if path == "/search" else 60, deadline=None,
              suppress_health_check=list(HealthCheck))
    def run(data):
        case = data.draw(strategy)
        calls.append(1)
        if mode == "positive" and "point_id" in (case.path_parameters or {}) and data.draw(st.booleans()):
            case.path_parameters["point_id"] = data.draw(st.sampled_from(point_ids))  # a stored point
        if mode == "positive" and path == "/search/image" and isinstance(case.body, dict):
            if data.draw(st.booleans()):
                case.body["image"] = data.draw(st.sampled_from(photos)).read_bytes()  # a real photo
            elif not _is_picture(case.body.get("image", b"")):  # random bytes are schema-valid, never a photo:
                response = case.call()  # refused for what they are, with the reason
                assert response.status_code in (415, 422) and "image" in response.text, response.text[:500]
                return
        if mode == "positive" and path == "/search" and _breaks_k_rule(case):
            response = case.call()
            assert response.status_code == 422 and "larger than rerank_k" in response.text, response.text
            return
        if mode == "negative":  # 4xx, where 413 (body over the byte cap, which OpenAPI cannot state) counts too
            response = case.call()
            assert 400 <= response.status_code < 500, (case.path_parameters, case.query, case.body,
                                                        response.content[:300])
            case.validate_response(response, excluded_checks=[negative_data_rejection])
            return
        case.call_and_validate()  # every check schemathesis has

    run()
    assert calls


def test_defaults_fit_any_limits():
    from edje_qdrant.http_schema import search_request_model

    for limits in (ServiceLimits(max_k=3, max_rerank_k=2), ServiceLimits(max_rerank_k=0), ServiceLimits()):
        body = search_request_model(limits)(query="a dog")
        assert 1 <= body.k <= limits.max_k and 0 <= body.rerank_k <= limits.max_rerank_k
        assert body.rerank_k == 0 or body.k <= body.rerank_k


def test_schema_states_the_limits(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
    request = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert request["query"]["minLength"] == 1 and request["query"]["maxLength"] == LIMITS.max_query_chars
    assert request["k"]["maximum"] == LIMITS.max_k and request["rerank_k"]["maximum"] == LIMITS.max_rerank_k
    small = spec["components"]["schemas"]["SmallFilter"]
    assert small["additionalProperties"] is False
    assert set(small["properties"]) == set(FILTER_KEYS)  # the rules' filter keys, no more


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_coverage_phase_boundaries_are_answered_as_the_schema_says(app, api_schema, mode):
    """The boundary values `schemathesis run` tries first (its coverage phase: each bound, just inside and just
    outside it). A match value bounded at int64 failed here: 9223372036854775999 reads as 2**63 in a double, so
    the schema let it through and the service answered 422 (issue 19)."""
    from schemathesis.generation import GenerationMode

    operation = next(r.ok() for r in api_schema.get_all_operations() if r.ok().path == "/search")
    config = api_schema.config.generation_for(operation=operation, phase="coverage")
    cases = list(api_schema.iter_coverage_cases(operation, generation_modes=[GenerationMode(mode)],
                                                generation_config=config))
    assert len(cases) > 20
    wrong = []
    for case in cases:
        response = case.call()
        if mode == "negative":
            if not 400 <= response.status_code < 500:
                wrong.append((case.body, response.status_code))
        elif _breaks_k_rule(case):
            if response.status_code != 422:
                wrong.append((case.body, response.status_code))
        elif response.status_code != 200:
            wrong.append((case.body, response.status_code, response.text[:300]))
    assert not wrong, wrong[:3]


def test_match_values_are_bounded_where_every_json_reader_agrees(app):
    from fastapi.testclient import TestClient

    from edje_qdrant.http_schema import MAX_SAFE_INT

    client = TestClient(app)
    value_schema = client.get("/openapi.json").json()["components"]["schemas"]["MatchValue"]["properties"]["value"]
    integer = next(s for s in value_schema["anyOf"] if s.get("type") == "integer")
    assert (integer["minimum"], integer["maximum"]) == (-MAX_SAFE_INT, MAX_SAFE_INT) == (-(2**53 - 1), 2**53 - 1)
    assert float(MAX_SAFE_INT) != float(MAX_SAFE_INT + 1)  # the bound and the first value past it stay apart

    def status(value):
        body = {"query": "a", "k": 2, "rerank_k": 4,
                "filter": {"must_not": [{"key": "metadata.width", "match": {"value": value}}]}}
        return client.post("/search", json=body)

    assert status(MAX_SAFE_INT).status_code == 200 and status(-MAX_SAFE_INT).status_code == 200
    for value in (MAX_SAFE_INT + 1, 9223372036854775999, -(2**63)):
        response = status(value)
        assert response.status_code == 422, response.text
        assert "less than or equal" in response.text or "greater than or equal" in response.text
