"""``ingest``, and its local executor: walk, hash, skip what is stored, decode in parallel, embed in batches,
upsert, sync (the per-file steps are in ``steps``, the run's common state in ``run``; ``distributed`` runs the same
steps on Ray).

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

import logging
import os
import queue
import threading
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import InputError
from ..schema import LOCATIONS_KEY, point_id
from ..store import open_store
from ..store.base import PointRecord, collection_spec
from .decode import DEFAULT_MAX_PIXELS, UnusableFile, register_plugins
from .distributed import ingest_on_ray
from .pool import HASH_PRIORITY, CancelledError, TaskPool
from .run import IngestRun
from .steps import (DEFAULT_FILE_TIMEOUT, ErrorLog, IngestReport, IngestSettings, Prepared, check_options, guarded,
                    hash_item, ingest_root, point_of, prepare, settings_for, walked_location)
from .walk import WalkError, WalkItem, display_path, walk_images

log = logging.getLogger(__name__)

__all__ = ["IngestReport", "LocalRun", "ingest"]


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
    root = ingest_root(folder)
    check_options(dtype, batch_size, workers, max_pixels, file_timeout)
    if _holds_nothing(root):
        log.info("ingest %s: no image found; nothing ingested, nothing removed", display_path(root))
        return IngestReport(prune_skipped="no images found")
    kwargs = dict(dtype=dtype, batch_size=batch_size, workers=workers, errors_file=errors_file, progress=progress,
                  max_pixels=max_pixels, file_timeout=file_timeout, prune=prune)
    with _store_and_model(store, model, device) as (target, loaded):
        if executor == "local":
            return _ingest_here(folder, target, loaded, collection, **kwargs)
        if executor != "ray":
            raise InputError(f"executor {executor!r} is not supported; use 'local' or 'ray'")
        return ingest_on_ray(folder, target, loaded, collection, options=ray_options, **kwargs)


@contextmanager
def _store_and_model(store: Any, model: Any, device: str | None) -> Iterator[tuple[Any, Any]]:
    """The store and the model, in the order that leaves nothing behind when one fails: an existing store (and its
    lock) first, then a named model, and only then a store folder that does not exist yet. A store given as a
    folder path is closed at the end."""
    owned = isinstance(store, (str, os.PathLike))  # a folder path: this call opens the store and closes it
    target = open_store(store) if not owned or os.path.exists(os.path.expanduser(store)) else None
    try:
        if isinstance(model, (str, os.PathLike)):
            from ..models import load_model  # cost: torch and the model's libraries, after the cheap checks

            model = load_model(os.fspath(model), device=device)
        if target is None:  # a new store folder: created once the model has loaded
            target = open_store(store)
        yield target, model
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
    settings = settings_for(folder, model, collection, dtype, batch_size, workers, max_pixels, file_timeout)
    spec = collection_spec(model, dtype)
    report = IngestReport()
    errors = ErrorLog(errors_file, report)
    try:
        store.open_collection(collection, spec)  # refuses a mismatched model before anything is written
    except BaseException:
        errors.close()
        raise
    register_plugins()
    return LocalRun(settings, store, model, report, errors, progress, prune).execute()


class LocalRun(IngestRun):
    """The local executor: a producer thread walks and hashes, a thread pool decodes, this thread embeds and
    writes (see the module docstring)."""

    def __init__(self, settings: IngestSettings, store: Any, model: Any, report: IngestReport, errors: ErrorLog,
                 progress: bool, prune: bool) -> None:
        super().__init__(settings, store, model, report, errors, prune)
        self.progress = progress
        self.seen: set[str] = set()
        self.batch: list[Prepared] = []
        self.stop = threading.Event()
        # Chunks of (item, sha or UnusableFile) from the producer; small so it stays close ahead.
        self.chunks: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
        self.pool = TaskPool(settings.decode_threads)
        self.producer = threading.Thread(target=self._produce, name="edje-ingest-walk", daemon=True)

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
        tasks = [self.pool.submit(guarded, hash_item, it, priority=HASH_PRIORITY) for it in items]
        out: list[tuple[WalkItem, Any]] = []
        for it, task in zip(items, tasks):
            try:
                out.append((it, self.pool.wait(task, self.settings.file_timeout)))
            except UnusableFile as exc:
                out.append((it, exc))
        return out

    def _walk(self) -> tuple[list[WalkItem], int] | None:
        """The whole walk first (it gives the progress total): the files, and how many problems were sent on;
        None when the run stopped meanwhile."""
        items: list[WalkItem] = []
        problems = 0
        for event in walk_images(self.settings.root):
            if self.stop.is_set():
                return None
            if isinstance(event, WalkError):
                problems += 1
                if not self._put(("walk_error", event)):
                    return None
                continue
            items.append(event)
        return items, problems

    def _produce(self) -> None:
        try:
            walked = self._walk()
            if walked is None or not self._put(("total", len(walked[0]) + walked[1])):
                return
            items, size = walked[0], self.settings.batch_size
            for start in range(0, len(items), size):
                if not self._put(("chunk", self._hash_chunk(items[start:start + size]))):
                    return
        except CancelledError:
            return  # shutdown cancelled our hashing
        except BaseException as exc:  # a bug: hand it to the calling thread
            self._put(("crash", exc))
        finally:
            self._put(("done", None))

    # -- calling thread -------------------------------------------------------------------------
    def work(self) -> None:
        if self.progress:
            self.open_bar("ingest")
        self.producer.start()
        self._consume()

    def release(self) -> None:
        self.stop.set()
        self.pool.shutdown()
        if self.producer.is_alive():
            self.producer.join(timeout=2.0)
        self.errors.close()

    def _consume(self) -> None:
        inflight: deque[tuple[WalkItem, Any]] = deque()
        window = 2 * self.settings.batch_size  # one batch decoding while the previous one is embedded
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
            elif kind == "walk_error":
                self.walk_problem(body)
            else:
                for item in self._check_chunk(body):
                    inflight.append((item, self.pool.submit(guarded, prepare, item, self.model, self.settings)))
                while len(inflight) > window:
                    self._collect(*inflight.popleft())
        while inflight:
            self._collect(*inflight.popleft())
        self._embed_batch()

    def _check_chunk(self, hashed: list[tuple[WalkItem, Any]]) -> list[WalkItem]:
        """Record hash failures and duplicates, ask the store once, return the items to decode."""
        ids: dict[str, WalkItem] = {}
        for item, result in hashed:
            if isinstance(result, UnusableFile):
                self.file_failed(item.path, result)
                continue
            pid = point_id(result)
            self.found.setdefault(pid, []).append(walked_location(item))
            if pid in self.seen or pid in ids:
                self.duplicate()
                continue
            ids[pid] = item
        self.seen.update(ids)
        return self.not_stored(ids)

    def _collect(self, item: WalkItem, task: Any) -> None:
        """Wait for one file's decoding; add it to the batch (embedded once full) or report why it failed."""
        try:
            prepared = self.pool.wait(task, self.settings.file_timeout)
        except UnusableFile as exc:
            self.file_failed(item.path, exc)
            return
        self.batch.append(prepared)
        if len(self.batch) >= self.settings.batch_size:
            self._embed_batch()

    def _embed_batch(self) -> None:
        """Embed the batch in one forward and store its points."""
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        unique: dict[str, Prepared] = {}
        for p in batch:  # content changed between hashing and decoding can make two ids meet
            if p.id in unique:
                self.duplicate()
            else:
                unique[p.id] = p
        prepared = list(unique.values())
        vectors, tokens = self.model.embed_images(np.stack([p.pixels for p in prepared]))
        points: list[PointRecord] = []
        for p, vec, tok in zip(prepared, vectors, tokens):
            try:
                points.append(point_of(p, vec, tok, self.settings.dtype, str(self.model.fingerprint)))
            except UnusableFile as exc:
                self.file_failed(p.source, exc)
                continue
            self.found.setdefault(p.id, list(p.metadata[LOCATIONS_KEY]))  # content changed after hashing
        if points:
            self.store_points(points)
            self.tick(len(points))


_POLL_PUT = 0.2
