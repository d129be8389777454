"""The picture behind a stored point, by point id only: its original file and JPEG thumbnails.

Safe by construction: the only paths ever opened are those the point's own payload lists (``metadata.locations``,
its ``source`` first), and a file is used only when its bytes still hash to the point's id (id = UUIDv5 of the
file's sha256). A request never names a path; a file moved, deleted or replaced since ingest is reported (with
the reason), never served in the point's place. Thumbnails are kept in memory (LRU, capped in bytes) and checked
against the file's size and mtime on every use.
"""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from PIL import Image

from edje_qdrant.errors import EdjeError, InputError, UnknownPointError
from edje_qdrant.ingestion.decode import UnusableFile, decode_image, read_file
from edje_qdrant.ingestion.ids import sha256_bytes
from edje_qdrant.schema import METADATA_KEY, MIME_KEY, SOURCE_KEY, canonical_id, point_id, stored_locations

__all__ = ["PointImages", "PointFile", "Thumbnail", "FileGone", "THUMBNAIL_SIZES"]

THUMBNAIL_SIZES = (32, 1024)  # smallest and largest thumbnail edge a caller may ask, in pixels
MAX_SERVED_BYTES = 256 * 1024 * 1024  # an original larger than this is not sent over HTTP
_JPEG_QUALITY = 82


class FileGone(EdjeError):
    """The point exists, but none of its files is still there with the content it was ingested with."""


@dataclass(frozen=True)
class PointFile:
    """An original file, read and verified: ``data`` hashes to ``point_id``."""

    point_id: str
    path: str
    data: bytes
    mime: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Thumbnail:
    jpeg: bytes
    etag: str  # content-addressed: the point id and the size


@dataclass(frozen=True)
class _Cached:
    thumbnail: Thumbnail
    path: str
    size: int
    mtime_ns: int


class PointImages:
    """Originals and thumbnails of one collection's points (``store``: any Store)."""

    def __init__(self, store: Any, collection: str, *, cache_bytes: int = 64 * 1024 * 1024,
                 max_file_bytes: int = MAX_SERVED_BYTES) -> None:
        self.store = store
        self.collection = collection
        self.max_file_bytes = max_file_bytes
        self._cache = _LruBytes(cache_bytes)

    def original(self, raw_id: str) -> PointFile:
        """The point's file, verified; UnknownPointError or FileGone (with every path tried and why) otherwise."""
        pid, metadata = self._metadata(raw_id)
        return self._read(pid, metadata)

    def thumbnail(self, raw_id: str, size: int) -> Thumbnail:
        """A JPEG that fits ``size`` x ``size`` (EXIF orientation applied); UnusableFile when the file does not
        decode, UnknownPointError / FileGone as ``original``."""
        if not THUMBNAIL_SIZES[0] <= size <= THUMBNAIL_SIZES[1]:
            raise InputError(f"size={size} is outside {THUMBNAIL_SIZES[0]}..{THUMBNAIL_SIZES[1]} pixels")
        pid, metadata = self._metadata(raw_id)
        key = f"{pid}/{size}"
        cached = self._cache.get(key)
        if cached is not None and _unchanged(cached):
            return cached.thumbnail
        found = self._read(pid, metadata)
        thumb = Thumbnail(jpeg=_jpeg_thumbnail(found.data, size), etag=f'"{pid}-{size}"')
        self._cache.put(key, _Cached(thumb, found.path, found.size, found.mtime_ns), len(thumb.jpeg))
        return thumb

    def _metadata(self, raw_id: str) -> tuple[str, dict[str, Any]]:
        try:
            pid = canonical_id(raw_id)
        except InputError:
            raise UnknownPointError(f"no point {raw_id!r} in collection '{self.collection}': point ids are UUIDs"
                                    ) from None
        hits = self.store.retrieve(self.collection, [pid], [METADATA_KEY])
        if not hits:
            raise UnknownPointError(f"no point {pid} in collection '{self.collection}'")
        return pid, dict(hits[0].payload.get(METADATA_KEY) or {})

    def _read(self, pid: str, metadata: dict[str, Any]) -> PointFile:
        reasons = []
        for location in stored_locations(metadata):
            path = location[SOURCE_KEY]
            try:
                st = os.stat(path)
                file = read_file(path, self.max_file_bytes)
            except FileNotFoundError:
                reasons.append(f"{path}: no such file")
                continue
            except (OSError, UnusableFile) as exc:
                reason = "no such file" if getattr(exc, "kind", "") == "vanished" else getattr(exc, "reason", exc)
                reasons.append(f"{path}: {reason}")
                continue
            if point_id(sha256_bytes(file.data)) != pid:
                reasons.append(f"{path}: the file changed since ingest (its content is no longer this point's)")
                continue
            mime = str(metadata.get(MIME_KEY) or "")
            return PointFile(pid, path, file.data, mime if mime.startswith("image/") else "application/octet-stream",
                             st.st_size, st.st_mtime_ns)
        detail = "; ".join(reasons) or "the point names no file"
        raise FileGone(f"the file of point {pid} moved or changed since ingest ({detail}); run `edje-qdrant ingest` "
                       "on its folder again to update the collection")


def _unchanged(cached: _Cached) -> bool:
    try:
        st = os.stat(cached.path)
    except OSError:
        return False
    return st.st_size == cached.size and st.st_mtime_ns == cached.mtime_ns


def _jpeg_thumbnail(data: bytes, size: int) -> bytes:
    """Decoded exactly as ingest decodes (pixel cap, EXIF orientation, any mode to RGB), then fitted and encoded."""
    picture = decode_image(data, draft_size=size).image
    if max(picture.size) > size:
        picture.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=_JPEG_QUALITY, optimize=False, progressive=False)
    return out.getvalue()


class _LruBytes:
    """A thread-safe LRU map whose entries are weighed in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: Any, weight: int) -> None:
        if weight > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, weight)
            self._bytes += weight
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
