"""Folder -> points: walk, hash, skip what is stored, decode in parallel, embed in batches, upsert, sync.

Threads and what they touch:
  producer thread   walks the whole folder first (the progress total), then hashes files (through the
                    pool, hashes first), in chunks
  pool workers      hash files; read + decode + preprocess images (Pillow releases the GIL)
  calling thread    ``store.existing_ids`` per chunk, model forward per batch, ``store.upsert``, then the sync
Only the calling thread touches the store and the model forward, so neither needs to be thread-safe.

Resume and idempotence come from the point id = UUIDv5(sha256 of the file): a re-run hashes, asks the
store which ids exist *before* decoding, and only decodes/embeds the rest. Each upsert is durable when
it returns, so after Ctrl-C or SIGKILL at most the batch in flight is redone. The same content under
two paths is one point whose payload names the first path met in walk order (and lists the others).

Once every new point is written, and only after a complete walk, the collection is synced with the
folder (``sync``): moved/renamed files get their new path (payload update, no re-encode), then points
whose content is no longer anywhere under the folder (deleted files, old content of changed files) are
deleted. Writes before deletes: a kill at any moment loses nothing that is still on disk.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

from ..codec import DTYPES, encode_tokens
from ..errors import CodecError, InputError
from ..schema import LOCATIONS_KEY, point_id, point_payload
from ..store.base import collection_spec
from ..store import open_store
from ..store.base import PointRecord
from .decode import (
    DEFAULT_MAX_PIXELS,
    UnusableFile,
    decode_image,
    draft_size_for,
    open_regular,
    read_file,
    register_plugins,
)
from .ids import sha256_bytes, sha256_stream
from .pool import HASH_PRIORITY, CancelledError, TaskPool
from .sync import Unreadable, sync_collection
from .walk import WalkError, WalkItem, display_path, walk_images

log = logging.getLogger(__name__)

DEFAULT_FILE_TIMEOUT = 60.0
MAX_FAILURES_KEPT = 100  # in the report; the errors file has all of them
_CAPTION_MAX_BYTES = 64 * 1024


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
class _Prepared:
    id: str
    pixels: np.ndarray
    page_content: str
    metadata: dict[str, Any]


@dataclass
class _Settings:
    root: Path
    collection: str
    dtype: str
    batch_size: int
    workers: int
    max_pixels: int
    file_timeout: float
    draft_size: int


def ingest(
    folder: str | os.PathLike[str],
    store: Any,
    model: Any,
    collection: str = "images",
    *,
    device: str | None = None,
    dtype: str = "fp16",
    batch_size: int | None = None,
    workers: int | None = None,
    errors_file: str | os.PathLike[str] | None = None,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    file_timeout: float = DEFAULT_FILE_TIMEOUT,
    prune: bool = True,
    executor: str = "local",
    ray_options: Any = None,
) -> IngestReport:
    """Embed every image under ``folder`` into ``collection`` and keep the collection equal to the folder;
    safe to re-run and to interrupt. ``store`` and ``model`` take the forms ``Retriever`` takes: a store folder
    path, a ``QdrantClient`` or a Store; an ``EdjeModel``, a preset name or a model folder.

    Points whose content is no longer under ``folder`` (deleted files, the old content of a changed file) are
    removed, moved or renamed files keep their point with the new path; only points whose path is under
    ``folder`` are considered, and nothing is removed after an interrupted walk, a walk that found no image, or
    with ``prune=False`` (see ``ingestion.sync`` for the rules).

    ``device`` places a model given by name (None: cuda when available, else cpu).

    ``executor="ray"`` spreads hashing and the model over a Ray cluster (``ray_options``: a
    ``distributed.RayOptions``; needs the ``ray`` extra), with the same ids, points and report.

    Broken files never stop the run: they are counted in ``failed`` and, when ``errors_file`` is given,
    written there as JSON lines ``{"path", "reason", "error_type", "kind"}`` (the file is rewritten
    each run). ``max_pixels`` refuses larger images (decompression bombs; a cap above Pillow's own hard
    limit, 2 x ``PIL.Image.MAX_IMAGE_PIXELS``, also needs that raised); ``file_timeout`` (seconds)
    abandons a file whose hashing or decoding takes longer. On KeyboardInterrupt the workers stop,
    everything already upserted stays, and the interrupt is re-raised with the partial report attached
    as ``exc.ingest_report``.

    What costs nothing is checked before what costs seconds: the folder and the options, then whether the folder
    holds any image (an empty folder returns an empty report and creates no store and no collection), then the
    store and its lock (an existing store is opened now), and only then is a named model loaded; a store folder
    that does not exist yet is created after that, so a bad folder, a locked store or a bad model leaves nothing.
    """
    root = _root(folder)
    _check_options(dtype, batch_size, workers, max_pixels, file_timeout)
    if _holds_nothing(root):
        log.info("ingest %s: no image found; nothing ingested, nothing removed", display_path(root))
        return IngestReport(prune_skipped="no images found")
    owned = isinstance(store, (str, os.PathLike))  # a folder path: this call opens the store and closes it
    target = open_store(store) if not owned or os.path.exists(os.path.expanduser(store)) else None
    try:
        if isinstance(model, (str, os.PathLike)):
            from ..models import load_model

            model = load_model(os.fspath(model), device=device)
        if target is None:  # a new store folder: created once the model has loaded
            target = open_store(store)
        kwargs = dict(dtype=dtype, batch_size=batch_size, workers=workers, errors_file=errors_file,
                      progress=progress, max_pixels=max_pixels, file_timeout=file_timeout, prune=prune)
        if executor != "local":
            return _ingest_elsewhere(executor, ray_options, folder, target, model, collection, **kwargs)
        return _ingest_here(folder, target, model, collection, **kwargs)
    finally:
        if owned and target is not None:
            target.close()


def _holds_nothing(root: Path) -> bool:
    """True when the walk meets neither an image nor a problem under ``root`` (it stops at the first)."""
    return next(iter(walk_images(root)), None) is None


def _ingest_here(folder: Any, store: Any, model: Any, collection: str, *, dtype: str, batch_size: int | None,
                 workers: int | None, errors_file: Any, progress: bool, max_pixels: int, file_timeout: float,
                 prune: bool) -> IngestReport:
    """The single-process pipeline (``ingest`` with ``executor="local"``)."""
    settings = _settings(folder, model, collection, dtype, batch_size, workers, max_pixels, file_timeout)
    spec = collection_spec(model, dtype)
    report = IngestReport()
    errors = _ErrorLog(errors_file, report)
    try:
        store.open_collection(collection, spec)  # refuses a mismatched model before anything is written
    except BaseException:
        errors.close()
        raise
    register_plugins()
    return _Run(settings, store, model, report, errors, progress, prune).execute()


def _ingest_elsewhere(executor: str, ray_options: Any, *args: Any, **kwargs: Any) -> IngestReport:
    """Dispatch to another executor (only "ray" so far: ``distributed.ingest_on_ray``)."""
    if executor != "ray":
        raise InputError(f"executor {executor!r} is not supported; use 'local' or 'ray'")
    from .distributed import ingest_on_ray

    return ingest_on_ray(*args, options=ray_options, **kwargs)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_options(dtype: str, batch_size: int | None, workers: int | None, max_pixels: int,
                   file_timeout: float) -> None:
    """The options that need no model (InputError naming the bad one)."""
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if batch_size is not None:
        _positive_int(batch_size, "batch_size")
    if workers is not None:
        _positive_int(workers, "workers")
    _positive_int(max_pixels, "max_pixels")
    if isinstance(file_timeout, bool) or not isinstance(file_timeout, (int, float)) or not file_timeout > 0:
        raise InputError(f"file_timeout must be a positive number of seconds, got {file_timeout!r}")


def _settings(folder: Any, model: Any, collection: str, dtype: str, batch_size: int | None, workers: int | None,
              max_pixels: int, file_timeout: float) -> _Settings:
    root = _root(folder)
    _check_options(dtype, batch_size, workers, max_pixels, file_timeout)
    bs = _positive_int(batch_size if batch_size is not None else int(model.image_batch_size), "batch_size")
    nw = workers if workers is not None else default_workers()
    return _Settings(root, collection, dtype, bs, nw, max_pixels, float(file_timeout), draft_size_for(model.vision))


def _root(folder: Any) -> Path:
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


class _ErrorLog:
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


def _hash_file(path: Path) -> str:
    fh, _ = open_regular(path)
    with fh:
        try:
            digest, _ = sha256_stream(fh)
        except OSError as exc:
            raise UnusableFile(f"read error: {exc.strerror or exc}", "unreadable", type(exc).__name__) from None
    return digest


def _location(item: WalkItem) -> dict[str, str]:
    return {"source": display_path(item.path), "folder": item.folder}


def caption_of(path: Path) -> str | None:
    """The text of a ``NAME.txt`` file beside the image (its page_content), if any."""
    side = path.with_name(path.name + ".txt")
    try:
        with open(side, "rb") as fh:
            raw = fh.read(_CAPTION_MAX_BYTES)
    except OSError:
        return None
    text = raw.decode("utf-8", "replace").strip()
    return text or None


def _guarded(fn: Any, item: WalkItem, *args: Any) -> Any:
    """Run a worker job; an unexpected exception becomes a reported file failure, not a stopped run."""
    try:
        return fn(item, *args)
    except UnusableFile:
        raise
    except Exception as exc:
        log.warning("unexpected error on %s", display_path(item.path), exc_info=True)
        raise UnusableFile(f"unexpected {type(exc).__name__}: {exc}", "error", type(exc).__name__) from None


def _hash_item(item: WalkItem) -> str:
    return _hash_file(item.path)


def _prepare(item: WalkItem, model: Any, s: _Settings) -> _Prepared:
    """Worker job: read, hash (the id is of the bytes actually decoded), decode, preprocess, payload."""
    content = read_file(item.path)
    sha = sha256_bytes(content.data)
    img = decode_image(content.data, max_pixels=s.max_pixels, draft_size=s.draft_size)
    try:
        pixels = np.asarray(model.vision.preprocess(img.image), dtype=np.float32)
    except Exception as exc:
        raise UnusableFile(f"model preprocessing failed: {exc}", "preprocess", type(exc).__name__) from None
    metadata: dict[str, Any] = {
        "source": display_path(item.path),
        "folder": item.folder,
        LOCATIONS_KEY: [_location(item)],
        "width": img.width,
        "height": img.height,
        "mtime": content.mtime,
        "size": content.size,
        "sha256": sha,
        "mime": img.mime,
        "orientation": img.orientation,
        **img.exif,
    }
    page_content = caption_of(item.path) or display_path(item.path.name)
    return _Prepared(id=point_id(sha), pixels=pixels, page_content=page_content, metadata=metadata)


@contextmanager
def interrupt_after() -> Iterator[None]:
    """Hold a SIGINT that arrives inside the block and raise it (KeyboardInterrupt) when the block ends. Only the
    main thread can change signal handlers; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(*caught[0])
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


class RunBase:
    """What every executor keeps while it runs (settings, store, model, report, errors file, where the walk met
    each content and what it could not read, the progress bar) and does alike: timing, the folder sync, the
    report on an interrupt and the closing log line."""

    label = "ingest"

    def __init__(self, s: _Settings, store: Any, model: Any, report: IngestReport, errors: _ErrorLog,
                 prune: bool) -> None:
        self.s = s
        self.store = store
        self.model = model
        self.report = report
        self.errors = errors
        self.prune = prune
        self.found: dict[str, list[dict[str, str]]] = {}  # point id -> where this walk met its content
        self.unreadable = Unreadable()
        self.bar: Any = None

    def _store(self, points: list[PointRecord]) -> None:
        """Upsert a batch and count it as one step: a Ctrl-C that lands meanwhile is raised right after, so the
        report never misses a batch that was stored (nor counts one that was not)."""
        with interrupt_after():
            self.store.upsert(self.s.collection, points)
            self.report.ingested += len(points)

    def _finish(self, t0: float) -> None:
        self.report.seconds = round(time.monotonic() - t0, 3)
        self.report.images_per_s = round(self.report.ingested / self.report.seconds, 2) if self.report.seconds else 0.0

    def _sync(self) -> None:
        """After a complete walk and every upsert: new paths first, then delete the stale points."""
        sync_collection(self.store, self.s.collection, self.s.root, self.found, self.unreadable, self.prune,
                        self.report, caption_of)

    def _failed_run(self, exc: BaseException, t0: float) -> None:
        """Before re-raising: the partial report, attached to a KeyboardInterrupt for the caller."""
        self.report.interrupted = isinstance(exc, KeyboardInterrupt)
        self._finish(t0)
        if isinstance(exc, KeyboardInterrupt):
            exc.ingest_report = self.report  # type: ignore[attr-defined]
            r = self.report
            # info, not warning: the caller gets the interrupt with the report and tells the user itself
            log.info("ingest interrupted after %d new, %d already stored, %d failed; re-run to resume",
                     r.ingested, r.skipped_existing, r.failed)

    def _done(self, t0: float) -> IngestReport:
        self._finish(t0)
        r = self.report
        log.info("%s %s: %d new, %d already stored, %d duplicates, %d failed, %d removed, %d moved in %.1f s "
                 "(%.1f img/s)", self.label, display_path(self.s.root), r.ingested, r.skipped_existing,
                 r.duplicates, r.failed, r.removed, r.moved, r.seconds, r.images_per_s)
        return r


class _Run(RunBase):
    def __init__(self, s: _Settings, store: Any, model: Any, report: IngestReport, errors: _ErrorLog,
                 progress: bool, prune: bool) -> None:
        super().__init__(s, store, model, report, errors, prune)
        self.progress = progress
        self.seen: set[str] = set()
        self.batch: list[_Prepared] = []
        self.stop = threading.Event()
        # Chunks of (item, sha or UnusableFile) from the producer; small so it stays close ahead.
        self.chunks: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
        self.pool = TaskPool(s.workers)

    # -- producer thread ------------------------------------------------------------------------
    def _put(self, msg: tuple[str, Any]) -> bool:
        while not self.stop.is_set():
            try:
                self.chunks.put(msg, timeout=_POLL_PUT)
                return True
            except queue.Full:
                continue
        return False

    def _hash_chunk(self, items: list[WalkItem]) -> list[tuple[WalkItem, Any]]:
        tasks = [self.pool.submit(_guarded, _hash_item, it, priority=HASH_PRIORITY) for it in items]
        out: list[tuple[WalkItem, Any]] = []
        for it, task in zip(items, tasks):
            try:
                out.append((it, self.pool.wait(task, self.s.file_timeout)))
            except UnusableFile as exc:
                out.append((it, exc))
        return out

    def _produce(self) -> None:
        try:
            items: list[WalkItem] = []
            problems = 0
            for ev in walk_images(self.s.root):  # the whole walk first: it gives the progress total
                if self.stop.is_set():
                    return
                if isinstance(ev, WalkError):
                    problems += 1
                    if not self._put(("walk_error", ev)):
                        return
                    continue
                items.append(ev)
            if not self._put(("total", len(items) + problems)):
                return
            for start in range(0, len(items), self.s.batch_size):
                if not self._put(("chunk", self._hash_chunk(items[start:start + self.s.batch_size]))):
                    return
        except CancelledError:
            return  # shutdown cancelled our hashing
        except BaseException as exc:  # a bug: hand it to the calling thread
            self._put(("crash", exc))
        finally:
            self._put(("done", None))

    # -- calling thread -------------------------------------------------------------------------
    def execute(self) -> IngestReport:
        t0 = time.monotonic()
        producer = threading.Thread(target=self._produce, name="edje-ingest-walk", daemon=True)
        try:
            if self.progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(desc="ingest", unit="img", dynamic_ncols=True)
            producer.start()
            self._consume()
            self._sync()
        except BaseException as exc:
            self._failed_run(exc, t0)
            raise
        finally:
            self.stop.set()
            self.pool.shutdown()
            if producer.is_alive():
                producer.join(timeout=2.0)
            self.errors.close()
            if self.bar is not None:
                self.bar.close()
        return self._done(t0)

    def _tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(new=self.report.ingested, skip=self.report.skipped_existing,
                                 fail=self.report.failed, refresh=False)

    def _consume(self) -> None:
        inflight: deque[tuple[WalkItem, Any]] = deque()
        window = 2 * self.s.batch_size  # one batch decoding while the previous one is embedded
        while True:
            kind, body = self.chunks.get()
            if kind == "done":
                break
            if kind == "crash":
                raise body
            if kind == "total":
                if self.bar is not None:
                    self.bar.total = body
                    self.bar.refresh()
                continue
            if kind == "walk_error":
                self.unreadable.folders.append(display_path(body.path))  # it, and anything under it
                self.errors.add(body.path, body.reason, body.error_type, "walk")
                self._tick()
                continue
            for item in self._check_chunk(body):
                inflight.append((item, self.pool.submit(_guarded, _prepare, item, self.model, self.s)))
            while len(inflight) > window:
                self._take(inflight.popleft())
        while inflight:
            self._take(inflight.popleft())
        self._flush()

    def _check_chunk(self, hashed: list[tuple[WalkItem, Any]]) -> list[WalkItem]:
        """Record hash failures and duplicates, ask the store once, return the items to decode."""
        ids: dict[str, WalkItem] = {}
        for item, result in hashed:
            if isinstance(result, UnusableFile):
                self._failed(item.path, result)
                continue
            pid = point_id(result)
            self.found.setdefault(pid, []).append(_location(item))
            if pid in self.seen or pid in ids:
                self.report.duplicates += 1
                self._tick()
                continue
            ids[pid] = item
        if not ids:
            return []
        existing = self.store.existing_ids(self.s.collection, list(ids))
        todo = []
        for pid, item in ids.items():
            self.seen.add(pid)
            if pid in existing:
                self.report.skipped_existing += 1
                self._tick()
            else:
                todo.append(item)
        return todo

    def _take(self, entry: tuple[WalkItem, Any]) -> None:
        item, task = entry
        try:
            prepared = self.pool.wait(task, self.s.file_timeout)
        except UnusableFile as exc:
            self._failed(item.path, exc)
            return
        self.batch.append(prepared)
        if len(self.batch) >= self.s.batch_size:
            self._flush()

    def _flush(self) -> None:
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        unique: dict[str, _Prepared] = {}
        for p in batch:  # content changed between hashing and decoding can make two ids meet
            if p.id in unique:
                self.report.duplicates += 1
                self._tick()
            else:
                unique[p.id] = p
        prepared = list(unique.values())
        vectors, tokens = self.model.embed_images(np.stack([p.pixels for p in prepared]))
        points: list[PointRecord] = []
        for p, vec, tok in zip(prepared, vectors, tokens):
            source = Path(p.metadata["source"])
            if not np.isfinite(vec).all() or not np.any(vec):
                self._failed(source, UnusableFile("the model produced a non-finite or all-zero embedding", "model",
                                                  "BadEmbedding"))
                continue
            try:
                blob = encode_tokens(tok, self.s.dtype)
            except CodecError as exc:
                self._failed(source, UnusableFile(f"cannot encode the image tokens: {exc}", "model",
                                                  type(exc).__name__))
                continue
            payload = point_payload(p.page_content, p.metadata, blob, str(self.model.fingerprint))
            points.append(PointRecord(id=p.id, vector=[float(x) for x in vec], payload=payload))
            self.found.setdefault(p.id, list(p.metadata[LOCATIONS_KEY]))  # content changed after hashing
        if points:
            self._store(points)
            self._tick(len(points))

    def _failed(self, path: Path, exc: UnusableFile) -> None:
        """Report a file the run could not use; whatever is stored for its path stays."""
        self.unreadable.files.add(display_path(path))
        self.errors.add(path, exc.reason, exc.error_type, exc.kind)
        self._tick()


_POLL_PUT = 0.2
