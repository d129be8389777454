"""What every ingest executor keeps while it runs and does alike: the store and model, the report and errors
file, where the walk met each content and what it could not read, the progress bar; asking the store which ids it
holds, storing a batch, recording a failure, the sync with the folder at the end, the report on an interrupt and
the closing log line. ``pipeline.LocalRun`` and ``distributed.RayRun`` add how the work is spread.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

from ..store.base import PointRecord
from .decode import UnusableFile
from .steps import ErrorLog, IngestReport, IngestSettings
from .sync import Unreadable, sync_collection
from .walk import WalkError, display_path

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class IngestRun:
    """The state and the shared steps of one ingest run (see the module docstring)."""

    label = "ingest"

    def __init__(self, settings: IngestSettings, store: Any, model: Any, report: IngestReport, errors: ErrorLog,
                 prune: bool) -> None:
        self.settings = settings
        self.store = store
        self.model = model
        self.report = report
        self.errors = errors
        self.prune = prune
        self.found: dict[str, list[dict[str, str]]] = {}  # point id -> where this walk met its content
        self.unreadable = Unreadable()
        self.bar: Any = None

    def execute(self) -> IngestReport:
        """The run: the executor's own work (``work``), then the sync with the folder; on any failure the partial
        report (attached to a KeyboardInterrupt) and the exception; what the run holds is released either way."""
        t0 = time.monotonic()
        try:
            self.work()
            self.sync()
        except BaseException as exc:
            self.failed_run(exc, t0)
            raise
        finally:
            self.release()
            if self.bar is not None:
                self.bar.close()
        return self.done(t0)

    def work(self) -> None:
        """Walk, hash, check, embed and store (each executor its own way)."""
        raise NotImplementedError

    def release(self) -> None:
        """Stop and free what ``work`` started (threads, pools, files); nothing by default."""

    def open_bar(self, description: str) -> None:
        from tqdm.auto import tqdm  # cost: tqdm (and its notebook probe) only when a bar is drawn

        self.bar = tqdm(desc=description, unit="img", dynamic_ncols=True)

    def tick(self, n: int = 1) -> None:
        """Advance the progress bar by ``n`` files."""
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(new=self.report.ingested, skip=self.report.skipped_existing,
                                 fail=self.report.failed, refresh=False)

    def walk_problem(self, problem: WalkError) -> None:
        """A folder the walk could not list: it, and anything under it, keeps its points."""
        self.unreadable.folders.append(display_path(problem.path))
        self.errors.add(problem.path, problem.reason, problem.error_type, "walk")
        self.tick()

    def file_failed(self, path: Path, exc: UnusableFile) -> None:
        """Report a file the run could not use; whatever is stored for its path stays."""
        self.unreadable.files.add(display_path(path))
        self.errors.add(path, exc.reason, exc.error_type, exc.kind)
        self.tick()

    def duplicate(self) -> None:
        """The same content met again (another path, or content changed between hashing and decoding)."""
        self.report.duplicates += 1
        self.tick()

    def not_stored(self, candidates: dict[str, T]) -> list[T]:
        """Of ``candidates`` (point id -> item), the items whose id the store does not hold yet, asked in one
        call; the others are counted as skipped."""
        if not candidates:
            return []
        existing = self.store.existing_ids(self.settings.collection, list(candidates))
        todo = []
        for pid, item in candidates.items():
            if pid in existing:
                self.report.skipped_existing += 1
                self.tick()
            else:
                todo.append(item)
        return todo

    def store_points(self, points: list[PointRecord]) -> None:
        """Upsert a batch and count it as one step: a Ctrl-C that lands meanwhile is raised right after, so the
        report never misses a batch that was stored (nor counts one that was not)."""
        with interrupt_after():
            self.store.upsert(self.settings.collection, points)
            self.report.ingested += len(points)

    def sync(self) -> None:
        """After a complete walk and every upsert: new paths first, then delete the stale points."""
        sync_collection(self.store, self.settings.collection, self.settings.root, self.found, self.unreadable,
                        self.prune, self.report)

    def _finish(self, t0: float) -> None:
        self.report.seconds = round(time.monotonic() - t0, 3)
        self.report.images_per_s = round(self.report.ingested / self.report.seconds, 2) if self.report.seconds else 0.0

    def failed_run(self, exc: BaseException, t0: float) -> None:
        """Before re-raising: the partial report, attached to a KeyboardInterrupt for the caller."""
        self.report.interrupted = isinstance(exc, KeyboardInterrupt)
        self._finish(t0)
        if isinstance(exc, KeyboardInterrupt):
            exc.ingest_report = self.report  # type: ignore[attr-defined]
            r = self.report
            # info, not warning: the caller gets the interrupt with the report and tells the user itself
            log.info("ingest interrupted after %d new, %d already stored, %d failed; re-run to resume",
                     r.ingested, r.skipped_existing, r.failed)

    def done(self, t0: float) -> IngestReport:
        """The final report, with its closing log line."""
        self._finish(t0)
        r = self.report
        log.info("%s %s: %d new, %d already stored, %d duplicates, %d failed, %d removed, %d moved in %.1f s "
                 "(%.1f img/s)", self.label, display_path(self.settings.root), r.ingested, r.skipped_existing,
                 r.duplicates, r.failed, r.removed, r.moved, r.seconds, r.images_per_s)
        return r
