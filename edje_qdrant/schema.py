"""What a stored point holds, in one place: the vector name, the payload keys, point ids and the payload itself.

Ingest writes points by these rules; the stores, the sync with the folder, the Retriever, the filters, the HTTP
service and the integrations read them from here, and nothing else spells a payload key. A leaf: it imports only
the error types (no torch, no qdrant-client).
"""
from __future__ import annotations

import uuid
from typing import Any, Iterable, Mapping

from edje_qdrant.errors import InputError

VECTOR_NAME = "clip"  # the one named vector: the global (first-stage) embedding, cosine distance
SPEC_KEY = "edje"  # the collection spec in collection metadata / the reserved point's payload
POINT_NAMESPACE = uuid.UUID("6f1c2b0e-5d3a-4e8f-9a47-3b2d8c1e7f05")  # never change: it names every stored point

# ------------------------------------------------------------------------------------------------ payload keys
TOKENS_KEY = "edje_tokens"  # the compressed image tokens (codec blob)
MODEL_KEY = "edje_model"  # fingerprint of the model that wrote the point
PAGE_CONTENT_KEY = "page_content"  # caption (NAME.txt beside the image) or the file name; LangChain's field
METADATA_KEY = "metadata"  # path, size, EXIF... (LangChain's field)
RESULT_PAYLOAD_KEYS = (PAGE_CONTENT_KEY, METADATA_KEY)  # what a search result carries

# keys inside ``metadata``
SOURCE_KEY = "source"  # the image's path (the first of its locations)
FOLDER_KEY = "folder"  # the path's folder relative to the ingested root ("" at the root)
LOCATIONS_KEY = "locations"  # every path this content was found at: [{SOURCE_KEY, FOLDER_KEY}]
WIDTH_KEY, HEIGHT_KEY = "width", "height"  # pixels, after EXIF orientation
MTIME_KEY = "mtime"  # the file's modification time (seconds since the epoch)
SIZE_KEY = "size"  # the file's size in bytes
SHA256_KEY = "sha256"  # of the file's bytes (the point id is made from it)
MIME_KEY = "mime"  # e.g. image/jpeg
ORIENTATION_KEY = "orientation"  # EXIF orientation 1-8
TAKEN_AT_KEY = "taken_at"  # EXIF capture time, ISO 8601
CAMERA_KEY, CAMERA_MAKE_KEY, CAMERA_MODEL_KEY = "camera", "camera_make", "camera_model"  # EXIF camera
GEO_KEY = "geo"  # EXIF GPS position {"lat", "lon"}

PAYLOAD_KEYS = (TOKENS_KEY, MODEL_KEY, PAGE_CONTENT_KEY, METADATA_KEY)
METADATA_KEYS = (SOURCE_KEY, FOLDER_KEY, LOCATIONS_KEY, WIDTH_KEY, HEIGHT_KEY, MTIME_KEY, SIZE_KEY, SHA256_KEY,
                 MIME_KEY, ORIENTATION_KEY, TAKEN_AT_KEY, CAMERA_KEY, CAMERA_MAKE_KEY, CAMERA_MODEL_KEY, GEO_KEY)


def metadata_field(key: str) -> str:
    """The payload path of a metadata key, as filters and payload indexes name it (``metadata.folder``)."""
    return f"{METADATA_KEY}.{key}"


# ------------------------------------------------------------------------------------------------ ids
def point_id(sha256_hex: str) -> str:
    """A point's id: UUIDv5 of the image file's sha256 (same bytes, same point, on every machine)."""
    if len(sha256_hex) != 64 or any(c not in "0123456789abcdef" for c in sha256_hex):
        raise InputError(f"expected a lowercase hex sha256, got {sha256_hex!r}")
    return str(uuid.uuid5(POINT_NAMESPACE, sha256_hex))


def canonical_id(raw: Any) -> str:
    """The canonical (lowercase UUID) form of a point id, or InputError naming the id."""
    try:
        return str(uuid.UUID(str(raw)))
    except (ValueError, TypeError, AttributeError):
        raise InputError(f"point id {raw!r} is not a UUID string; points of an edje-qdrant collection have UUIDv5 "
                         "ids of their file's sha256") from None


def canonical_ids(ids: Iterable[Any]) -> dict[str, Any]:
    """Canonical id -> the id as the caller gave it (first occurrence wins)."""
    out: dict[str, Any] = {}
    for raw in ids:
        out.setdefault(canonical_id(raw), raw)
    return out


# ------------------------------------------------------------------------------------------------ payload
def point_payload(page_content: str, metadata: Mapping[str, Any], token_blob: str, fingerprint: str
                  ) -> dict[str, Any]:
    """The payload of one stored image."""
    return {PAGE_CONTENT_KEY: page_content, METADATA_KEY: dict(metadata), TOKENS_KEY: token_blob,
            MODEL_KEY: fingerprint}


def location(source: str, folder: str) -> dict[str, str]:
    """One entry of ``metadata.locations``: a path holding the picture and its folder under the ingested root."""
    return {SOURCE_KEY: source, FOLDER_KEY: folder}


def stored_locations(metadata: Mapping[str, Any]) -> list[dict[str, str]]:
    """The point's locations; a point written before they were recorded has its one ``source``."""
    locs = metadata.get(LOCATIONS_KEY)
    if isinstance(locs, list) and all(isinstance(x, dict) and isinstance(x.get(SOURCE_KEY), str) for x in locs):
        return [location(x[SOURCE_KEY], str(x.get(FOLDER_KEY, ""))) for x in locs]
    source = metadata.get(SOURCE_KEY)
    return [location(source, str(metadata.get(FOLDER_KEY, "")))] if isinstance(source, str) else []
