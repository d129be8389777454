"""HTTP API over a Retriever (FastAPI): POST /search, the images of points and image search
(``service_images``), the search page and offline /docs (``service_page``), GET /healthz, GET /metrics, OpenAPI
at /openapi.json.

Install with ``pip install 'edje-qdrant[service]'`` (from a checkout: ``pip install -e ".[service]"``); run with
``edje-qdrant serve``. Requests are validated (4xx with a message naming the field), bodies are capped, and k /
rerank_k / query length have service limits.
With ``api_keys`` set, the search and image routes need ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``;
image URLs returned with results are signed instead, so ``<img>`` tags load them (``service_auth``).
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

from edje_qdrant.integrations import require

require("fastapi", "service")

from fastapi import FastAPI, HTTPException, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from edje_qdrant import __version__  # noqa: E402
from edje_qdrant.errors import EdjeError, InputError, StoreError  # noqa: E402
from edje_qdrant.http_schema import ErrorOut, SearchResponse, filter_data, search_request_model  # noqa: E402
from edje_qdrant.retriever import Retriever  # noqa: E402
from edje_qdrant.search_args import check_search_args  # noqa: E402
from edje_qdrant.store.filters import filter_from_json  # noqa: E402
from edje_qdrant.service_auth import Access, check_key  # noqa: E402
from edje_qdrant.service_images import IMAGE_SEARCH_PATH, add_image_routes  # noqa: E402
from edje_qdrant.service_page import add_page_routes  # noqa: E402
from edje_qdrant.service_state import ResultsOut, RetrieverHolder, ServiceLimits, get_retriever  # noqa: E402

__all__ = ["ServiceLimits", "create_app", "Metrics"]

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
    """413 when Content-Length or the streamed body exceeds ``max_bytes`` (``per_path``: other caps by path)."""

    def __init__(self, app: Any, max_bytes: int, per_path: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # served under a prefix: the routes' own paths
            path = path[len(root):]
        cap = self.per_path.get(path, self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            response = JSONResponse({"detail": _too_large(cap)}, status_code=413)
            await response(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise HTTPException(413, _too_large(cap))
            return message

        await self.app(scope, limited_receive, send)


def _too_large(cap: int) -> str:
    return f"request body is larger than this service's limit of {cap} bytes"


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


def create_app(
    retriever: Retriever | Callable[[], Retriever],
    *,
    limits: ServiceLimits = ServiceLimits(),
    api_keys: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app. ``retriever`` is a Retriever or a zero-argument factory (built lazily, closed at exit)."""
    holder = RetrieverHolder(retriever)
    metrics = Metrics()
    access = Access(api_keys)
    results_out = ResultsOut(access)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        holder.close()

    app = FastAPI(title="edje-qdrant", version=__version__,
                  description="Text-to-image search on Qdrant with EDJE re-ranking.", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # /docs is served offline by service_page
    app.state.metrics = metrics
    app.state.limits = limits
    upload_cap = limits.max_upload_bytes + max(limits.max_body_bytes, 64 * 1024)  # the photo + the form's fields
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes, per_path={IMAGE_SEARCH_PATH: upload_cap})
    app.add_middleware(_Metered, metrics=metrics)  # outermost: counts 413s too
    app.add_exception_handler(RequestValidationError, _validation_error)
    _add_search_route(app, holder, metrics, limits, access, results_out)
    add_image_routes(app, holder, metrics.observe, limits, access, results_out)
    _add_health_routes(app, holder, metrics)
    add_page_routes(app)
    return app


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 413, 422, 503)}


def _add_search_route(app: FastAPI, holder: RetrieverHolder, metrics: Metrics, limits: ServiceLimits,
                      access: Access, results_out: ResultsOut) -> None:
    """POST /search: body checked by the schema built from ``limits``, then by the same rules as the library."""

    def search(body: BaseModel, request: Request) -> dict[str, Any]:
        """Top ``k`` images for ``query``: ANN over ``rerank_k`` candidates, re-ranked by the joint encoder."""
        check_key(request, access)
        try:
            check_search_args(body.query, body.k, body.rerank_k, limits)
        except InputError as exc:
            raise HTTPException(422, [{"field": getattr(exc, "field", "body"), "message": str(exc)}]) from None
        try:
            flt = filter_from_json(filter_data(body.filter))
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None
        r = get_retriever(holder)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        try:
            results = r.search(body.query, k=body.k, rerank_k=body.rerank_k, filter=flt, timings=timings)
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None
        except StoreError as exc:
            log.warning("search failed: %s", exc)
            raise HTTPException(503, f"the vector store failed: {exc}") from None
        took = time.perf_counter() - start
        stages = dict(timings)
        stages.setdefault("total", took)
        for stage, seconds in stages.items():
            metrics.observe(str(stage), float(seconds))
        return {"query": body.query, "k": body.k, "rerank_k": body.rerank_k, "collection": r.collection,
                "took_ms": round(took * 1000, 3), "results": results_out(results, request)}

    search.__annotations__["body"] = search_request_model(limits)  # the schema carries this app's limits
    app.post("/search", response_model=SearchResponse, responses=_ERROR_RESPONSES)(search)


def _add_health_routes(app: FastAPI, holder: RetrieverHolder, metrics: Metrics) -> None:
    @app.get("/healthz", responses={503: {"model": ErrorOut}})
    def healthz() -> JSONResponse:
        """200 when the collection can be searched; 503 (with the reason) otherwise."""
        try:
            r = holder.get()
            points = r.store.count(r.collection)
        except EdjeError as exc:
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "collection": r.collection, "model": r.spec.model, "points": points,
                             "version": __version__})

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        """Prometheus text format: request counts and per-stage latency histograms."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one ``{"field", "message"}`` per problem; the limits' messages read as the library's."""
    problems = []
    for e in exc.errors():
        field = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        problems.append({"field": field, "message": _message(field, e)})
    return JSONResponse({"detail": problems}, status_code=422)


def _message(field: str, e: dict[str, Any]) -> str:
    kind, ctx, given = e.get("type", ""), e.get("ctx") or {}, e.get("input")
    if kind == "less_than_equal" and field in ("k", "rerank_k"):
        return f"{field}={given} is above this service's limit of {ctx.get('le')}"
    if kind == "string_too_long" and field == "query":
        return f"query has {len(given)} characters; this service's limit is {ctx.get('max_length')}"
    if kind in ("string_too_short", "string_pattern_mismatch") and field == "query":
        return "query is empty; pass some text to search for"
    return str(e.get("msg", ""))
