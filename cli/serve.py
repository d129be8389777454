"""`edje-qdrant serve`: the search page and the HTTP search API (FastAPI + uvicorn) over one collection."""
from __future__ import annotations

import ipaddress
import threading
import time
import urllib.request
import webbrowser
from typing import Any

import click

from edje_qdrant.errors import EdjeError, install_hint

from .options import library_errors, model_options, open_store_from, store_options

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


@click.command()
@store_options
@model_options(None)
@click.option("--host", envvar="EDJE_HOST", show_envvar=True, default=DEFAULT_HOST, show_default=True,
              help="Address to bind; use 0.0.0.0 only behind a firewall or with --service-api-key.")
@click.option("--port", envvar="EDJE_PORT", show_envvar=True, type=click.IntRange(0, 65535), default=DEFAULT_PORT,
              show_default=True, help="TCP port.")
@click.option("--max-k", type=click.IntRange(min=1), default=100, show_default=True,
              help="Largest k a request may ask.")
@click.option("--max-rerank-k", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Largest rerank_k a request may ask.")
@click.option("--max-body-bytes", type=click.IntRange(min=256), default=64 * 1024, show_default=True,
              help="Largest request body accepted (413 above).")
@click.option("--max-upload-bytes", type=click.IntRange(min=1024), default=20 * 1024 * 1024, show_default=True,
              help="Largest photo accepted by POST /search/image (413 above).")
@click.option("--service-api-key", envvar="EDJE_SERVICE_API_KEY", show_envvar=True, default=None,
              help="If set, the search and image routes need 'Authorization: Bearer KEY' or 'X-API-Key: KEY' "
                   "(never printed); the page asks for it once, and image URLs in results are signed.")
@click.option("--open", "open_page", is_flag=True, help="Open the search page in a web browser once it answers.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn log level.")
@library_errors
def serve(store: str, url: str | None, api_key: str | None, collection: str, model: str | None,
          device: str | None, host: str, port: int, max_k: int, max_rerank_k: int, max_body_bytes: int,
          max_upload_bytes: int, service_api_key: str | None, open_page: bool, log_level: str) -> None:
    """Serve the search page (/), POST /search, image search and the images of points, GET /healthz,
    GET /metrics and the API docs (/docs) for one collection."""
    try:
        import uvicorn  # cost: the `service` extra, only for this command

        from edje_qdrant.service import ServiceLimits, create_app  # cost: as above (FastAPI)
    except ImportError as exc:
        raise click.ClickException(f"{exc}. The service needs the `service` extra: {install_hint('service')}") from None
    from edje_qdrant.retriever import Retriever  # cost: imported per command, so --help and argument errors stay fast

    def factory() -> Retriever:
        target = open_store_from(store, url, api_key, create=False)
        try:
            return Retriever(target, collection, model, device=device)
        except BaseException:
            target.close()
            raise

    try:
        factory_or_retriever: Any = factory()
        factory_or_retriever.search("warm up", k=1, rerank_k=1)  # the first search of a process is the slowest
    except EdjeError as exc:
        if not url:  # embedded store: fail fast (missing collection, store locked by another process)
            raise
        # A server (e.g. in docker compose) may not be up or ingested yet: retry on each request until it works.
        click.echo(f"not ready yet: {exc}; retrying on each request (/healthz answers 503 until then)", err=True)
        factory_or_retriever = factory
    app = create_app(
        factory_or_retriever,
        limits=ServiceLimits(max_k=max_k, max_rerank_k=max_rerank_k, max_body_bytes=max_body_bytes,
                             max_upload_bytes=max_upload_bytes),
        api_keys=[service_api_key] if service_api_key else [],
    )
    if not _is_loopback(host) and not service_api_key:
        click.echo(f"warning: listening on {host} without --service-api-key: anyone who can reach port {port} "
                   "can search this collection", err=True)
    from edje_qdrant.store import redact_url  # cost: imported per command, so --help and argument errors stay fast

    where = redact_url(url) if url else store
    page = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    click.echo(f"serving collection '{collection}' from {where} on http://{host}:{port} "
               f"(search page: {page}, API docs at /docs)", err=True)
    if open_page:
        threading.Thread(target=_open_when_up, args=(page,), daemon=True).start()
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5, server_header=False)


def _open_when_up(page: str, wait_s: float = 60.0) -> None:
    """Open ``page`` in the default browser as soon as the server answers it (gives up after ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(page, timeout=2):
                break
        except OSError:
            time.sleep(0.2)
    else:
        return
    webbrowser.open(page)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":  # pragma: no cover
    serve()
