"""The service's image routes: a point's thumbnail and original file, "more like this" from a point, and search
by an uploaded photo.

Files are found by point id only (``point_images``): a request never names a path. An unknown id is 404, a file
that moved or changed since ingest 404 with the reason, a file that does not decode 422. Uploads get the formats
and pixel cap ingest applies (``uploads``) and this service's byte cap (413 above it).
"""
# No `from __future__ import annotations`: the routes' parameter types carry this app's limits, built at runtime.
import logging
import time
from typing import Annotated, Any, Callable, Optional
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import StringConstraints, WithJsonSchema

from edje_qdrant.errors import EdjeError, InputError, StoreError, UnknownPointError
from edje_qdrant.http_schema import MAX_FILTER_ITEMS, MAX_FILTER_TEXT, ErrorOut, ImageSearchResponse, When
from edje_qdrant.ingestion.decode import UnusableFile
from edje_qdrant.point_images import THUMBNAIL_SIZES, FileGone
from edje_qdrant.schema import CAMERA_KEY, FOLDER_KEY, MIME_KEY, canonical_id
from edje_qdrant.store.filters import FILTER_HELP, FILTER_KEYS, TAKEN_AFTER, TAKEN_BEFORE, filter_from_json
from edje_qdrant.service_auth import MISSING_KEY, Access, check_key
from edje_qdrant.service_state import ResultsOut, RetrieverHolder, ServiceLimits, get_retriever
from edje_qdrant.uploads import check_upload

__all__ = ["add_image_routes", "IMAGE_SEARCH_PATH", "DEFAULT_THUMBNAIL_SIZE"]

log = logging.getLogger("edje_qdrant.service")

IMAGE_SEARCH_PATH = "/search/image"
DEFAULT_THUMBNAIL_SIZE = 256
_CACHE = "private, max-age=3600"  # a URL names one point's content (its id is the content's hash) and one size
_IMAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
                  "Cache-Control": _CACHE}

FilterText = Annotated[str, StringConstraints(max_length=MAX_FILTER_TEXT)]
# A query or form field is absent or a value: never JSON null (which a form could only send as the text "null").
FilterTexts = Annotated[Optional[list[FilterText]], WithJsonSchema(
    {"type": "array", "items": {"type": "string", "maxLength": MAX_FILTER_TEXT}, "maxItems": MAX_FILTER_ITEMS})]
FilterWhen = Annotated[Optional[When], WithJsonSchema(
    {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]})]
PointIdPath = Annotated[str, Path(max_length=64, description="a point id (UUID) of this collection")]
_K_DOC = "results to return"
def add_image_routes(app: FastAPI, holder: RetrieverHolder, observe: Callable[[str, float], None],
                     limits: ServiceLimits, access: Access, results_out: ResultsOut) -> None:
    """GET /points/{id}/thumbnail, /points/{id}/image, /points/{id}/similar and POST /search/image."""
    _add_file_routes(app, holder, access)
    _add_similar_routes(app, holder, observe, limits, access, results_out)


def _add_file_routes(app: FastAPI, holder: RetrieverHolder, access: Access) -> None:
    signed = {"exp": "expiry (Unix time) of a signed URL, as returned with results",
              "sig": "signature of a signed URL, as returned with results"}
    Exp = Annotated[Optional[int], Query(ge=0, le=2**62, description=signed["exp"])]
    Sig = Annotated[Optional[str], Query(max_length=64, description=signed["sig"])]
    Size = Annotated[int, Query(ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1],
                                description="largest edge of the thumbnail in pixels")]
    responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"image/jpeg": {}}, "description": "the image"},
        **{code: {"model": ErrorOut} for code in (401, 404, 422, 503)},
    }

    @app.get("/points/{point_id}/thumbnail", response_class=Response, responses=responses,
             summary="Thumbnail of a point's image")
    def thumbnail(point_id: PointIdPath, request: Request, size: Size = DEFAULT_THUMBNAIL_SIZE, exp: Exp = None,
                  sig: Sig = None) -> Response:
        """A JPEG thumbnail of a point's image (EXIF orientation applied), cached in memory. With an API key set,
        send the key or use the signed URL returned with the results."""
        _allow_image(request, access, point_id, exp, sig)
        thumb = _serve(lambda: holder.images().thumbnail(point_id, size), holder)
        headers = {**_IMAGE_HEADERS, "ETag": thumb.etag}
        if request.headers.get("if-none-match") == thumb.etag:
            return Response(status_code=304, headers=headers)
        return Response(thumb.jpeg, media_type="image/jpeg", headers=headers)

    @app.get("/points/{point_id}/image", response_class=Response, summary="Original file of a point",
             responses={**responses, 200: {"content": {"image/*": {}}, "description": "the original file"}})
    def original(point_id: PointIdPath, request: Request, exp: Exp = None, sig: Sig = None) -> Response:
        """The original file of a point, as ingested (only if its content is unchanged)."""
        _allow_image(request, access, point_id, exp, sig)
        found = _serve(lambda: holder.images().original(point_id), holder)
        name = found.path.rsplit("/", 1)[-1]
        headers = {**_IMAGE_HEADERS, "ETag": f'"{found.point_id}"',
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name, safe='')}"}
        return Response(found.data, media_type=found.mime, headers=headers)


def _add_similar_routes(app: FastAPI, holder: RetrieverHolder, observe: Callable[[str, float], None],
                        limits: ServiceLimits, access: Access, results_out: ResultsOut) -> None:
    responses: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (400, 401, 404, 413, 415,
                                                                                        422, 503)}
    Count = Annotated[int, Query(ge=1, le=limits.max_k, description=_K_DOC)]

    @app.get("/points/{point_id}/similar", response_model=ImageSearchResponse, responses=responses,
             summary="More like this point")
    def similar(point_id: PointIdPath, request: Request, raw_filter: Annotated[dict, Depends(_filter_fields(Query))],
                k: Count = min(10, limits.max_k)) -> dict[str, Any]:
        """"More like this": the points nearest to a stored point's global vector (first stage only, so
        rerank_score is null; the point itself is left out). Filters as in /search's small form."""
        check_key(request, access)
        flt = _small_filter(raw_filter)
        r = get_retriever(holder)
        start = time.perf_counter()
        try:
            results = r.search_similar(point_id, k=k, filter=flt)
        except UnknownPointError as exc:
            raise HTTPException(404, str(exc)) from None
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None
        except StoreError as exc:
            raise HTTPException(503, f"the vector store failed: {exc}") from None
        return _response(results, request, r.collection, k, canonical_id(point_id), start, observe, results_out)

    _add_upload_route(app, holder, observe, limits, access, results_out, responses)


def _add_upload_route(app: FastAPI, holder: RetrieverHolder, observe: Callable[[str, float], None],
                      limits: ServiceLimits, access: Access, results_out: ResultsOut,
                      responses: dict[int | str, dict[str, Any]]) -> None:
    image_doc = (f"the photo to search by (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC/HEIF, AVIF; at most "
                 f"{limits.max_upload_bytes} bytes)")

    @app.post(IMAGE_SEARCH_PATH, response_model=ImageSearchResponse, responses=responses,
              summary="Search by an uploaded photo")
    def search_image(request: Request, image: Annotated[UploadFile, File(description=image_doc)],
                     raw_filter: Annotated[dict, Depends(_filter_fields(Form))],
                     k: Annotated[int, Form(ge=1, le=limits.max_k, description=_K_DOC)] = min(10, limits.max_k)
                     ) -> dict[str, Any]:
        """Search by an uploaded photo: the stored images nearest to it on the global vector (first stage only;
        the photo itself is left out when it is in the collection). Same formats and pixel cap as ingest."""
        check_key(request, access)
        flt = _small_filter(raw_filter)
        data = image.file.read(limits.max_upload_bytes + 1)
        try:
            check_upload(data, limits.max_upload_bytes)
        except UnusableFile as exc:  # 413 over the byte cap, 415 not an image format ingest reads, else 422
            status = 413 if exc.error_type == "FileTooLarge" else 415 if exc.kind == "not_image" else 422
            raise HTTPException(status, f"image: {exc.reason}") from None
        r = get_retriever(holder)
        start = time.perf_counter()
        try:
            results = r.search_image(data, k=k, filter=flt)
        except InputError as exc:  # pixel cap (decompression bombs), corrupt pixels
            raise HTTPException(422, str(exc)) from None
        except StoreError as exc:
            raise HTTPException(503, f"the vector store failed: {exc}") from None
        return _response(results, request, r.collection, k, None, start, observe, results_out)


def _filter_fields(field: Any) -> Callable[..., dict[str, Any]]:
    """A dependency that reads the small filter form's fields from the query (``field=Query``) or the form
    (``Form``) as given; the route checks them (``_small_filter``) after the API key."""
    texts = {key: Annotated[FilterTexts, field(max_length=MAX_FILTER_ITEMS, description=FILTER_HELP[key])]
             for key in (FOLDER_KEY, CAMERA_KEY, MIME_KEY)}
    dates = {key: Annotated[FilterWhen, field(description=FILTER_HELP[key])] for key in (TAKEN_AFTER, TAKEN_BEFORE)}

    def fields(folder: texts[FOLDER_KEY] = None, camera: texts[CAMERA_KEY] = None, mime: texts[MIME_KEY] = None,
               taken_after: dates[TAKEN_AFTER] = None, taken_before: dates[TAKEN_BEFORE] = None) -> dict[str, Any]:
        return dict(zip(FILTER_KEYS, (folder, taken_after, taken_before, camera, mime)))

    return fields


def _small_filter(raw: dict[str, Any]) -> Any:
    """The small filter form from query or form fields (a repeated field means any of; absent fields: no filter)."""
    data = {key: (value[0] if isinstance(value, list) and len(value) == 1 else value)
            for key, value in raw.items() if value not in (None, [])}
    try:
        return filter_from_json(data or None)
    except InputError as exc:
        raise HTTPException(400, str(exc)) from None


def _response(results: Any, request: Request, collection: str, k: int, similar_to: str | None, start: float,
              observe: Callable[[str, float], None], results_out: ResultsOut) -> dict[str, Any]:
    took = time.perf_counter() - start
    observe("image_search", took)
    return {"k": k, "collection": collection, "took_ms": round(took * 1000, 3), "similar_to": similar_to,
            "results": results_out(results, request)}


def _allow_image(request: Request, access: Access, point_id: str, exp: int | None, sig: str | None) -> None:
    try:
        pid = canonical_id(point_id)
    except InputError:
        pid = point_id  # never signed: only a key lets it through (then it is a 404)
    if not access.allows_image(request.headers, pid, exp, sig):
        raise HTTPException(401, MISSING_KEY + ", or use the signed URL returned with the results",
                            headers={"WWW-Authenticate": "Bearer"})


def _serve(read: Callable[[], Any], holder: RetrieverHolder) -> Any:
    """Run a point-image lookup, turning its errors into the routes' status codes."""
    get_retriever(holder)  # 503 while the collection cannot be opened
    try:
        return read()
    except (UnknownPointError, FileGone) as exc:
        raise HTTPException(404, str(exc)) from None
    except UnusableFile as exc:
        raise HTTPException(422, f"the point's file does not decode: {exc.reason}") from None
    except InputError as exc:
        raise HTTPException(422, str(exc)) from None
    except StoreError as exc:
        raise HTTPException(503, f"the vector store failed: {exc}") from None
    except EdjeError as exc:
        log.warning("image lookup failed: %s", exc)
        raise HTTPException(503, str(exc)) from None
