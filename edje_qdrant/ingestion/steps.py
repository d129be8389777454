"""The steps both ingest executors (``pipeline``: threads in this process, ``distributed``: Ray) run the same way,
so ids, vectors and payloads are the same whichever runs: the options and settings of a run, its report and
errors file, and per file: hash, prepare (read, hash, decode, preprocess, payload), and embedded image -> point.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..codec import DTYPES, encode_tokens
from ..errors import CodecError, InputError
from ..schema import (FOLDER_KEY, HEIGHT_KEY, LOCATIONS_KEY, MIME_KEY, MTIME_KEY, ORIENTATION_KEY, SHA256_KEY,
                      SIZE_KEY, SOURCE_KEY, WIDTH_KEY, location, point_id, point_payload)
from ..store.base import PointRecord
from .decode import UnusableFile, decode_image, draft_size_for, open_regular, read_file
from .ids import sha256_bytes, sha256_stream
from .walk import WalkItem, display_path

log = logging.getLogger(__name__)

DEFAULT_FILE_TIMEOUT = 60.0
MAX_FAILURES_KEPT = 100  # in the report; the errors file has all of them
CAPTION_MAX_BYTES = 64 * 1024


@dataclass
class IngestReport:
    """What one ``ingest`` call did. ``failures`` holds the first 100 problems; the errors file has all."""

    ingested: int = 0
    skipped_existing: int = 0
    duplicates: int = 0  # same content met again under another path in this run (one point)
    failed: int = 0
    removed: int = 0  # points deleted by the sync: content no longer anywhere under the folder
    moved: int = 0  # points whose path changed (file moved or renamed): payload updated, not re-encoded
    prune_skipped: str | None = None  # why stale points were not removed this run (None: the sync ran)
    seconds: float = 0.0
    images_per_s: float = 0.0  # ingested images per second of wall time
    errors_file: str | None = None
    interrupted: bool = False
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def seen(self) -> int:
        return self.ingested + self.skipped_existing + self.duplicates + self.failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IngestSettings:
    """What every step of one run needs to know (picklable: Ray workers get a copy)."""

    root: Path  # the ingested folder, absolute
    collection: str
    dtype: str  # token storage: "fp16" | "int8"
    batch_size: int  # images per model forward
    decode_threads: int  # threads that hash and decode files (in each Ray worker, with Ray)
    max_pixels: int
    file_timeout: float  # seconds a file may take to hash or decode
    draft_size: int  # decoders may shrink JPEGs to this edge before decoding (the model's input size)


@dataclass
class Prepared:
    """One file ready for the model: its point id, preprocessed pixels and payload text and metadata."""

    id: str
    pixels: np.ndarray
    page_content: str
    metadata: dict[str, Any]

    @property
    def source(self) -> Path:
        return Path(self.metadata[SOURCE_KEY])


# --------------------------------------------------------------------------- options and settings
def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_options(dtype: str, batch_size: int | None, workers: int | None, max_pixels: int,
                  file_timeout: float) -> None:
    """The options that need no model (InputError naming the bad one)."""
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if batch_size is not None:
        positive_int(batch_size, "batch_size")
    if workers is not None:
        positive_int(workers, "workers")
    positive_int(max_pixels, "max_pixels")
    if isinstance(file_timeout, bool) or not isinstance(file_timeout, (int, float)) or not file_timeout > 0:
        raise InputError(f"file_timeout must be a positive number of seconds, got {file_timeout!r}")


def ingest_root(folder: Any) -> Path:
    """The ingest folder as an absolute path; InputError when it is missing or not a directory."""
    root = Path(os.path.abspath(os.fspath(folder)))
    if not root.exists():
        raise InputError(f"ingest folder {display_path(root)} does not exist; pass an existing directory of images")
    if not root.is_dir():
        raise InputError(f"ingest folder {display_path(root)} is not a directory; pass the folder that holds the images")
    return root


def default_workers() -> int:
    """Decode threads: one per core (at least 2, at most 8); the model forward runs beside them."""
    return max(2, min(8, os.cpu_count() or 2))


def settings_for(folder: Any, model: Any, collection: str, dtype: str, batch_size: int | None,
                 workers: int | None, max_pixels: int, file_timeout: float) -> IngestSettings:
    """A run's settings, checked; ``batch_size`` defaults to the model's, ``workers`` (decode threads) to
    ``default_workers()``."""
    root = ingest_root(folder)
    check_options(dtype, batch_size, workers, max_pixels, file_timeout)
    batch = positive_int(batch_size if batch_size is not None else int(model.image_batch_size), "batch_size")
    threads = workers if workers is not None else default_workers()
    return IngestSettings(root, collection, dtype, batch, threads, max_pixels, float(file_timeout),
                          draft_size_for(model.vision))


# --------------------------------------------------------------------------- the errors file
class ErrorLog:
    """Counts failures; writes each to the JSON-lines errors file as it happens (flushed)."""

    def __init__(self, path: str | os.PathLike[str] | None, report: IngestReport) -> None:
        self._report = report
        self._fh: TextIO | None = None
        if path is not None:
            p = Path(path)
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(p, "w", encoding="utf-8")
            except OSError as exc:
                raise InputError(
                    f"cannot write the errors file {display_path(p)}: {exc.strerror or exc}; pass a writable path"
                ) from None
            report.errors_file = str(p)

    def add(self, path: Path, reason: str, error_type: str, kind: str) -> None:
        record = {"path": display_path(path), "reason": reason, "error_type": error_type, "kind": kind}
        self._report.failed += 1
        if len(self._report.failures) < MAX_FAILURES_KEPT:
            self._report.failures.append(record)
        log.info("skipped %s: %s", record["path"], reason)
        if self._fh is not None:
            self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------- per file
def guarded(fn: Any, item: WalkItem, *args: Any) -> Any:
    """Run a worker job; an unexpected exception becomes a reported file failure, not a stopped run."""
    try:
        return fn(item, *args)
    except UnusableFile:
        raise
    except Exception as exc:
        log.warning("unexpected error on %s", display_path(item.path), exc_info=True)
        raise UnusableFile(f"unexpected {type(exc).__name__}: {exc}", "error", type(exc).__name__) from None


def hash_item(item: WalkItem) -> str:
    """Worker job: the sha256 of a walked file (its point id is made from it)."""
    fh, _ = open_regular(item.path)
    with fh:
        try:
            digest, _ = sha256_stream(fh)
        except OSError as exc:
            raise UnusableFile(f"read error: {exc.strerror or exc}", "unreadable", type(exc).__name__) from None
    return digest


def walked_location(item: WalkItem) -> dict[str, str]:
    """Where the walk met a file, as ``metadata.locations`` records it."""
    return location(display_path(item.path), item.folder)


def caption_of(path: Path) -> str | None:
    """The text of a ``NAME.txt`` file beside the image (its page_content), if any."""
    side = path.with_name(path.name + ".txt")
    try:
        with open(side, "rb") as fh:
            raw = fh.read(CAPTION_MAX_BYTES)
    except OSError:
        return None
    text = raw.decode("utf-8", "replace").strip()
    return text or None


def prepare(item: WalkItem, model: Any, settings: IngestSettings) -> Prepared:
    """Worker job: read, hash (the id is of the bytes actually decoded), decode, preprocess, payload."""
    content = read_file(item.path)
    sha = sha256_bytes(content.data)
    img = decode_image(content.data, max_pixels=settings.max_pixels, draft_size=settings.draft_size)
    try:
        pixels = np.asarray(model.vision.preprocess(img.image), dtype=np.float32)
    except Exception as exc:
        raise UnusableFile(f"model preprocessing failed: {exc}", "preprocess", type(exc).__name__) from None
    metadata: dict[str, Any] = {
        SOURCE_KEY: display_path(item.path),
        FOLDER_KEY: item.folder,
        LOCATIONS_KEY: [walked_location(item)],
        WIDTH_KEY: img.width,
        HEIGHT_KEY: img.height,
        MTIME_KEY: content.mtime,
        SIZE_KEY: content.size,
        SHA256_KEY: sha,
        MIME_KEY: img.mime,
        ORIENTATION_KEY: img.orientation,
        **img.exif,
    }
    page_content = caption_of(item.path) or display_path(item.path.name)
    return Prepared(id=point_id(sha), pixels=pixels, page_content=page_content, metadata=metadata)


def point_of(prepared: Prepared, vector: np.ndarray, tokens: np.ndarray, dtype: str, fingerprint: str
             ) -> PointRecord:
    """The point of one embedded image; UnusableFile (kind ``"model"``) when its embedding cannot be stored."""
    if not np.isfinite(vector).all() or not np.any(vector):
        raise UnusableFile("the model produced a non-finite or all-zero embedding", "model", "BadEmbedding")
    try:
        blob = encode_tokens(tokens, dtype)
    except CodecError as exc:
        raise UnusableFile(f"cannot encode the image tokens: {exc}", "model", type(exc).__name__) from None
    payload = point_payload(prepared.page_content, prepared.metadata, blob, fingerprint)
    return PointRecord(id=prepared.id, vector=[float(x) for x in vector], payload=payload)
