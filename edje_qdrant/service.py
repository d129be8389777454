"""HTTP API over a Retriever (FastAPI): POST /search, GET /healthz, GET /metrics, OpenAPI at /openapi.json.

Install with ``pip install 'edje-qdrant[service]'`` (from a checkout: ``pip install -e ".[service]"``); run with
``edje-qdrant serve``. Requests are validated (4xx with a message naming the field), bodies are capped, and k /
rerank_k / query length have service limits.
With ``api_keys`` set, /search needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""
from __future__ import annotations

import hmac
import inspect
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from edje_qdrant.integrations import require

require("fastapi", "service")

from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr  # noqa: E402

from edje_qdrant import __version__  # noqa: E402
from edje_qdrant.errors import EdjeError, InputError, StoreError  # noqa: E402
from edje_qdrant.retriever import Retriever  # noqa: E402

__all__ = ["ServiceLimits", "create_app", "Metrics"]

log = logging.getLogger(__name__)

FILTER_CLAUSES = ("must", "should", "must_not", "min_should")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ServiceLimits:
    """Caps on what one request may ask for."""

    max_k: int = 100
    max_rerank_k: int = 1000
    max_query_chars: int = 2000
    max_body_bytes: int = 64 * 1024


# --------------------------------------------------------------------------- request / response models


class SearchRequest(BaseModel):
    """Body of POST /search. ``filter``: a Qdrant Filter as JSON (must/should/must_not) or the small dict form
    ``{"folder": "...", "taken_after": "2024-01-01", "taken_before": ..., "camera": ..., "mime": ...}``."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr = Field(description="Text to search for.")
    k: StrictInt = Field(10, ge=1, description="Results to return.")
    rerank_k: StrictInt = Field(100, ge=0, description="First-stage candidates to re-rank (0 = no re-ranking).")
    filter: dict[str, Any] | None = Field(None, description="Qdrant Filter JSON or the small dict form.")


class ResultOut(BaseModel):
    id: str
    path: str | None
    score: float = Field(description="What the results are sorted by: rerank_score + the model's fusion_weight x "
                                     "first_stage_score when re-ranked, first_stage_score when not.")
    first_stage_score: float = Field(description="Cosine similarity of the ANN (first-stage) search.")
    rerank_score: float | None = Field(description="The joint encoder's logit; null when not re-ranked.")
    page_content: str
    metadata: dict[str, Any]
    flags: list[str]


class SearchResponse(BaseModel):
    query: str
    k: int
    rerank_k: int
    collection: str
    took_ms: float
    results: list[ResultOut]


class ErrorOut(BaseModel):
    detail: Any


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Request counts and latency histograms, rendered in the Prometheus text format."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._buckets = tuple(buckets)
        self._requests: dict[tuple[str, str, int], int] = {}
        self._hist: dict[str, list[float]] = {}  # stage -> bucket counts + [sum, count]

    def count_request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            key = (method, route, status)
            self._requests[key] = self._requests.get(key, 0) + 1

    def observe(self, stage: str, seconds: float) -> None:
        with self._lock:
            h = self._hist.setdefault(stage, [0.0] * (len(self._buckets) + 2))
            for i, edge in enumerate(self._buckets):
                if seconds <= edge:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def render(self) -> str:
        lines = [
            "# HELP edje_http_requests_total HTTP requests by method, route and status code.",
            "# TYPE edje_http_requests_total counter",
        ]
        with self._lock:
            for (method, route, status), n in sorted(self._requests.items()):
                labels = f'method="{method}",route="{_esc(route)}",status="{status}"'
                lines.append(f"edje_http_requests_total{{{labels}}} {n}")
            lines += [
                "# HELP edje_search_stage_seconds Time spent per search stage "
                "(request = whole HTTP call, total = Retriever.search; embed_query, ann_fetch, decode, rerank "
                "when the Retriever reports them).",
                "# TYPE edje_search_stage_seconds histogram",
            ]
            for stage, h in sorted(self._hist.items()):
                for edge, n in zip(self._buckets, h):
                    lines.append(f'edje_search_stage_seconds_bucket{{stage="{_esc(stage)}",le="{edge:g}"}} {n:.0f}')
                lines.append(f'edje_search_stage_seconds_bucket{{stage="{_esc(stage)}",le="+Inf"}} {h[-1]:.0f}')
                lines.append(f'edje_search_stage_seconds_sum{{stage="{_esc(stage)}"}} {h[-2]:.6f}')
                lines.append(f'edje_search_stage_seconds_count{{stage="{_esc(stage)}"}} {h[-1]:.0f}')
        return "\n".join(lines) + "\n"


def _esc(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --------------------------------------------------------------------------- body size cap (pure ASGI)


class _BodyLimit:
    """413 when Content-Length or the streamed body exceeds ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = JSONResponse({"detail": self._message()}, status_code=413)
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body is larger than this service's limit of {self.max_bytes} bytes"


class _Metered:
    """Counts requests by method, route template and status; times /search end to end (stage ``request``)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.count_request(scope.get("method", ""), route, status)
            if route == "/search":
                self.metrics.observe("request", time.perf_counter() - start)


# --------------------------------------------------------------------------- the app


class _RetrieverHolder:
    """A Retriever given directly, or built on first use (and rebuilt until it succeeds, e.g. before ingest)."""

    def __init__(self, source: Retriever | Callable[[], Retriever]) -> None:
        self._given = not callable(source) or isinstance(source, Retriever)
        self._source = source
        self._retriever: Retriever | None = source if self._given else None  # type: ignore[assignment]
        self._lock = threading.Lock()

    def get(self) -> Retriever:
        if self._retriever is not None:
            return self._retriever
        with self._lock:
            if self._retriever is None:
                self._retriever = self._source()  # type: ignore[operator]
                log.info("retriever ready on collection %r", self._retriever.collection)
            return self._retriever

    def close(self) -> None:
        if not self._given and self._retriever is not None:
            self._retriever.store.close()


def create_app(
    retriever: Retriever | Callable[[], Retriever],
    *,
    limits: ServiceLimits = ServiceLimits(),
    api_keys: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app. ``retriever`` is a Retriever or a zero-argument factory (built lazily, closed at exit)."""
    holder = _RetrieverHolder(retriever)
    metrics = Metrics()
    keys = [k.encode() for k in api_keys if k]
    wants_timings: dict[int, bool] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        holder.close()

    app = FastAPI(
        title="edje-qdrant",
        version=__version__,
        description="Text-to-image search on Qdrant with EDJE re-ranking.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.limits = limits

    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(_Metered, metrics=metrics)  # outermost: counts 413s too

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body", "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    def check_key(request: Request) -> None:
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not any(hmac.compare_digest(given.encode(), k) for k in keys):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")

    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorOut} for code in (400, 401, 413, 422, 503)
    }

    @app.post("/search", response_model=SearchResponse, responses=responses)
    def search(body: SearchRequest, request: Request) -> dict[str, Any]:
        """Top ``k`` images for ``query``: ANN over ``rerank_k`` candidates, re-ranked by the joint encoder."""
        check_key(request)
        _check_limits(body, limits)
        flt = _parse_filter(body.filter)
        r = _get_retriever(holder)
        kwargs: dict[str, Any] = {}
        if wants_timings.setdefault(id(r), "timings" in inspect.signature(r.search).parameters):
            kwargs["timings"] = {}
        start = time.perf_counter()
        try:
            results = r.search(body.query, k=body.k, rerank_k=body.rerank_k, filter=flt, **kwargs)
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None
        except StoreError as exc:
            log.warning("search failed: %s", exc)
            raise HTTPException(503, f"the vector store failed: {exc}") from None
        took = time.perf_counter() - start
        stages = dict(kwargs.get("timings") or {})
        stages.setdefault("total", took)
        for stage, seconds in stages.items():
            metrics.observe(str(stage), float(seconds))
        return {
            "query": body.query,
            "k": body.k,
            "rerank_k": body.rerank_k,
            "collection": r.collection,
            "took_ms": round(took * 1000, 3),
            "results": [x.to_dict() for x in results],
        }

    @app.get("/healthz", responses={503: {"model": ErrorOut}})
    def healthz() -> JSONResponse:
        """200 when the collection can be searched; 503 (with the reason) otherwise."""
        try:
            r = holder.get()
            points = r.store.count(r.collection)
        except EdjeError as exc:
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse(
            {"status": "ok", "collection": r.collection, "model": r.spec.model, "points": points,
             "version": __version__}
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus text format: request counts and per-stage latency histograms."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _get_retriever(holder: _RetrieverHolder) -> Retriever:
    try:
        return holder.get()
    except EdjeError as exc:
        log.warning("retriever not ready: %s", exc)
        raise HTTPException(503, str(exc)) from None


def _check_limits(body: SearchRequest, limits: ServiceLimits) -> None:
    problems = []
    if body.k > limits.max_k:
        problems.append({"field": "k", "message": f"k={body.k} is above this service's limit of {limits.max_k}"})
    if body.rerank_k > limits.max_rerank_k:
        problems.append({"field": "rerank_k", "message":
                         f"rerank_k={body.rerank_k} is above this service's limit of {limits.max_rerank_k}"})
    if len(body.query) > limits.max_query_chars:
        problems.append({"field": "query", "message":
                         f"query has {len(body.query)} characters; this service's limit is {limits.max_query_chars}"})
    if not body.query.strip():
        problems.append({"field": "query", "message": "query is empty; pass some text to search for"})
    if body.rerank_k and body.k > body.rerank_k:
        problems.append({"field": "k", "message":
                         f"k={body.k} is larger than rerank_k={body.rerank_k}; raise rerank_k or set it to 0"})
    if problems:
        raise HTTPException(422, problems)


def _parse_filter(raw: dict[str, Any] | None) -> Any:
    """Qdrant Filter JSON -> models.Filter; the small dict form is passed on as is (the store converts it)."""
    if not raw:
        return None
    if any(key in raw for key in FILTER_CLAUSES):
        from pydantic import ValidationError
        from qdrant_client import models

        try:
            return models.Filter.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()) if "[" not in str(p))
            raise HTTPException(400, f"filter is not a valid Qdrant Filter at {where or 'top level'}: {first['msg']}")
    return dict(raw)
