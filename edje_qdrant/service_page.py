"""The service's pages: the search page at ``/`` and the API docs at ``/docs``, both offline.

The page is plain HTML/CSS/JS shipped in the package (``edje_qdrant/web``): no CDN, no build step. ``/docs`` is
Swagger UI from the ``swagger-ui-bundle-v2`` wheel (part of the ``service`` extra), started by a script of ours
so that no inline script is needed. Both are sent with a Content-Security-Policy that allows this origin only.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

try:  # Swagger UI's files, from the swagger-ui-bundle-v2 wheel (service extra)
    from swagger_ui_bundle import swagger_ui_path
except ImportError:  # then /docs says how to install it, and /openapi.json still works
    swagger_ui_path = None

__all__ = ["add_page_routes", "WEB_DIR"]

WEB_DIR = Path(__file__).resolve().parent / "web"
_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def add_page_routes(app: FastAPI) -> None:
    """GET / (the search page), /static/* (its script and style), /docs and /docs/assets/* (Swagger UI)."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(WEB_DIR / "docs.html", media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    swagger = swagger_ui_dir()
    if swagger is not None:
        app.mount("/docs/assets", StaticFiles(directory=swagger), name="docs-assets")


def swagger_ui_dir() -> Path | None:
    """The folder of Swagger UI's files from the ``swagger-ui-bundle-v2`` wheel, or None when it is not
    installed (then /docs says how to install it)."""
    if swagger_ui_path is None:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None
