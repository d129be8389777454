"""Ingest on a Ray cluster: the hashing and the vision tower + adapter spread over a Ray Data pool.

Phases (the same rules as the single-process ``pipeline``, so ids, vectors and payloads are the same):
  driver       walks the folder (listing only)
  Ray tasks    hash the files (the ids: UUIDv5 of the sha256), in walk order
  driver       drops duplicates and asks the store which ids exist, *before* anything is decoded
  Ray actors   build the model themselves from what names it (the preset name or model folder, plus the
               fingerprint they must reproduce: a model holds locks and deferred towers, and nothing that
               cannot be pickled crosses a process boundary), then read, decode, preprocess, run the vision
               tower + adapter in batches (``workers`` actors, each with ``gpus_per_worker`` GPUs), encode the
               tokens; then either upsert the points themselves
               (a Qdrant server: every actor has its own client) or hand them back to the driver, the one
               writer of a single-process store (Qdrant Edge, qdrant-client local mode)
Every upsert is durable when it returns and point ids come from the content, so a killed actor (Ray restarts
it and retries its batch) or a killed driver loses at most the batches in flight, which a re-run redoes.
Ray is an optional extra: ``pip install 'edje-qdrant[ray]'``.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np

from .. import errors
from ..errors import InputError, ModelMismatchError, install_hint
from ..schema import LOCATIONS_KEY, METADATA_KEY, point_id
from ..store.base import CollectionSpec, PointRecord, collection_spec
from .decode import DEFAULT_MAX_PIXELS, UnusableFile, register_plugins
from .pool import HASH_PRIORITY, TaskPool
from .run import IngestRun
from .steps import (DEFAULT_FILE_TIMEOUT, ErrorLog, IngestReport, IngestSettings, Prepared, guarded, hash_item,
                    point_of, prepare, settings_for, walked_location)
from .walk import WalkError, WalkItem, walk_images

log = logging.getLogger(__name__)

_CHECK_CHUNK = 1024  # ids per store.existing_ids call
_HASH_BATCH = 64  # files per hashing task
# the columns of the Ray datasets of walked files
PATH_COLUMN = "path"  # the file's path, as bytes (os.fsencode)
FOLDER_COLUMN = "folder"  # its folder under the ingested root (becomes metadata.folder)


class RayUnavailableError(InputError):
    """``executor="ray"`` without Ray installed."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray executor runs.

    ``address``: None starts a local Ray instance (or joins the one ``RAY_ADDRESS`` names, or the one this process
    already started); "auto" joins the cluster running on this machine; "HOST:PORT" or "ray://HOST:10001" a remote
    one. ``workers`` actors embed images, each holding the model once, with ``cpus_per_worker`` CPUs (its torch
    threads) and ``gpus_per_worker`` GPUs (a fraction shares a GPU). ``decode_threads`` decode inside each actor.
    ``direct_writes``: None = actors write to the store themselves when it is a Qdrant server, else through the
    driver; False forces the driver. ``on_batch`` is called on the driver after each batch is stored.
    """

    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    decode_threads: int = 2
    direct_writes: bool | None = None
    on_batch: Callable[[IngestReport], None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise InputError(f"Ray workers must be a positive integer, got {self.workers!r}")
        if isinstance(self.decode_threads, bool) or not isinstance(self.decode_threads, int) or self.decode_threads < 1:
            raise InputError(f"decode_threads must be a positive integer, got {self.decode_threads!r}")
        if not isinstance(self.cpus_per_worker, (int, float)) or not self.cpus_per_worker > 0:
            raise InputError(f"cpus_per_worker must be a positive number, got {self.cpus_per_worker!r}")
        if not isinstance(self.gpus_per_worker, (int, float)) or self.gpus_per_worker < 0:
            raise InputError(f"gpus_per_worker must be 0 or more, got {self.gpus_per_worker!r}")


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or RayUnavailableError with the install command."""
    try:
        import ray  # cost: Ray is an optional extra (seconds to import)
        import ray.data  # noqa: F401  cost: as above (the extra installs ray[data]; plain `ray` lacks pyarrow/pandas)
    except ImportError as exc:
        raise RayUnavailableError(f"distributed ingest needs Ray (Ray Data), which is not installed ({exc}); "
                                  f"install it with: {install_hint('ray')}") from None
    return ray


def ingest_on_ray(folder: str | os.PathLike[str], store: Any, model: Any, collection: str = "images", *,
                  options: RayOptions | None = None, workers: int | None = None, dtype: str = "fp16",
                  batch_size: int | None = None, errors_file: str | os.PathLike[str] | None = None,
                  progress: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                  file_timeout: float = DEFAULT_FILE_TIMEOUT, prune: bool = True) -> IngestReport:
    """``ingest(..., executor="ray")``: the same arguments, report and errors file, with the work spread over Ray
    (see the module docstring). ``workers`` here means decode threads inside each actor; the number of actors is
    ``options.workers``. The collection is synced with the folder afterwards exactly as ``ingest`` does."""
    opts = options or RayOptions()
    ray = import_ray()
    if not getattr(model, "source", ""):
        raise InputError("ingest on Ray rebuilds the model in each worker from its preset name or model folder; this "
                         "model has none (built by hand?): pass the name or folder, or a model from load_model()")
    threads = workers if workers is not None else opts.decode_threads
    settings = settings_for(folder, model, collection, dtype, batch_size, threads, max_pixels, file_timeout)
    spec = collection_spec(model, dtype)
    connection = _worker_connection(store, opts)
    report = IngestReport()
    errors = ErrorLog(errors_file, report)
    started_ray = False
    try:
        store.open_collection(collection, spec)  # refuses a mismatched model before anything is written
        started_ray = _connect(ray, opts)
        return RayRun(ray, settings, spec, store, model, report, errors, opts, connection, progress,
                      prune).execute()
    finally:
        errors.close()
        if started_ray:
            ray.shutdown()


def _worker_connection(store: Any, opts: RayOptions) -> dict[str, Any] | None:
    """Client arguments for actors that write themselves, or None when the driver is the one writer."""
    if opts.direct_writes is False:
        return None
    connect = getattr(store, "connection", None)
    conn = connect() if callable(connect) else None
    if opts.direct_writes and conn is None:
        raise InputError("direct_writes needs a Qdrant server store (--url); the embedded store and qdrant-client "
                         "local mode are single-process, so points go through the driver")
    return conn


def _connect(ray: Any, opts: RayOptions) -> bool:
    """Join or start Ray; True when this call started it (and so shuts it down at the end)."""
    if ray.is_initialized():
        return False
    local = opts.address is None and not os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"address": opts.address, "logging_level": logging.WARNING, "log_to_driver": False}
    if local:  # a private instance on this machine: no dashboard, loopback only
        kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot join the Ray cluster at {opts.address or os.environ.get('RAY_ADDRESS')!r}: {exc}; "
                         "start it with `ray start --head` or pass its address to --ray") from None
    return True


# -------------------------------------------------------------------------------------------- Ray-side work

_pools: dict[str, TaskPool] = {}


def _pool(name: str, threads: int) -> TaskPool:
    """One thread pool per worker process (decoders that hang are abandoned after the per-file limit)."""
    if name not in _pools:
        _pools[name] = TaskPool(threads, name=f"edje-ray-{name}")
    return _pools[name]


def _walk_items(batch: dict[str, np.ndarray]) -> list[WalkItem]:
    """The walked files of a batch of rows (path bytes, folder)."""
    return [WalkItem(Path(os.fsdecode(bytes(p))), str(f)) for p, f in zip(batch[PATH_COLUMN], batch[FOLDER_COLUMN])]


def _hash_batch(batch: dict[str, np.ndarray], file_timeout: float) -> dict[str, np.ndarray]:
    """Ray task: sha256 of each file, or why it cannot be read."""
    pool = _pool("hash", 2)
    items = _walk_items(batch)
    tasks = [pool.submit(guarded, hash_item, it, priority=HASH_PRIORITY) for it in items]
    sha, reason, kind, etype = [], [], [], []
    for task in tasks:
        try:
            sha.append(pool.wait(task, file_timeout))
            reason.append(""), kind.append(""), etype.append("")
        except UnusableFile as exc:
            sha.append(""), reason.append(exc.reason), kind.append(exc.kind), etype.append(exc.error_type)
    return {PATH_COLUMN: batch[PATH_COLUMN], FOLDER_COLUMN: batch[FOLDER_COLUMN], "sha": np.array(sha, dtype=object),
            "reason": np.array(reason, dtype=object), "kind": np.array(kind, dtype=object),
            "error_type": np.array(etype, dtype=object)}


def worker_model(source: str, fingerprint: str, precision: str, device: str) -> Any:
    """The model a worker embeds with, built here from what names it; ModelMismatchError when it is not the
    driver's model (another version of the folder or the wheels on this node would store other vectors)."""
    from ..models import load_model  # cost: torch, only in processes that embed

    model = load_model(source, device=device, precision=precision, parts=("vision", "reranker"))
    if model.fingerprint != fingerprint:
        raise ModelMismatchError(
            f"Ray worker on {socket.gethostname()}: model {source!r} loads as {model.fingerprint}, but the driver's "
            f"is {fingerprint}; install the same edje-qdrant, model wheels and model folder on every node")
    return model


class EmbedWorker:
    """Ray actor: file -> decoded pixels -> vision tower + adapter -> point; writes it or returns it."""

    def __init__(self, model_source: str, fingerprint: str, precision: str, settings: IngestSettings,
                 connection: dict[str, Any] | None, spec: CollectionSpec) -> None:
        import ray  # cost: Ray is an optional extra (in a Ray worker it is loaded already)

        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.model = worker_model(model_source, fingerprint, precision, device)
        self.settings = settings
        self.fingerprint = fingerprint
        self.sink = None
        if connection is not None:
            from qdrant_client import QdrantClient  # cost: qdrant-client takes seconds, only for direct writes

            from ..store.server import ClientStore  # cost: as above (it imports qdrant-client)

            self.sink = ClientStore(QdrantClient(**connection), url=connection.get("url") or connection.get("host"))
            self.sink.open_collection(settings.collection, spec, create=False)
        register_plugins()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[tuple[str, str, bytes, bytes]] = []  # (outcome, id, path, body)
        prepared = self._prepare(batch, rows)
        points: list[PointRecord] = []
        if prepared:
            vectors, tokens = self.model.embed_images(np.stack([p.pixels for p in prepared]))
            for p, vec, tok in zip(prepared, vectors, tokens):
                try:
                    points.append(point_of(p, vec, tok, self.settings.dtype, self.fingerprint))
                except UnusableFile as exc:
                    rows.append(("failed", p.id, os.fsencode(p.source), _failure(exc)))
        if points and self.sink is not None:
            self.sink.upsert(self.settings.collection, points)  # durable when it returns (wait=True)
            rows.extend(("written", p.id, b"", b"") for p in points)
        else:
            rows.extend(("point", p.id, b"", _pack_point(p)) for p in points)
        return {name: np.array([r[i] for r in rows], dtype=object)
                for i, name in enumerate(("outcome", "id", PATH_COLUMN, "body"))}

    def _prepare(self, batch: dict[str, np.ndarray], rows: list[tuple[str, str, bytes, bytes]]) -> list[Prepared]:
        """Read, decode and preprocess the batch's files on this worker's threads; failures and duplicates go to
        ``rows``."""
        pool = _pool("decode", self.settings.decode_threads)
        items = _walk_items(batch)
        tasks = [pool.submit(guarded, prepare, it, self.model, self.settings) for it in items]
        prepared: dict[str, Prepared] = {}
        for item, task in zip(items, tasks):
            try:
                p = pool.wait(task, self.settings.file_timeout)
            except UnusableFile as exc:
                rows.append(("failed", "", os.fsencode(item.path), _failure(exc)))
                continue
            if p.id in prepared:  # content changed between hashing and decoding can make two ids meet
                rows.append(("duplicate", p.id, os.fsencode(item.path), b""))
            else:
                prepared[p.id] = p
        return list(prepared.values())


def _worker_start_error(exc: Exception) -> Exception:
    """Our own error when a worker failed to start with one (e.g. it could not rebuild the driver's model): Ray
    reports it as an actor death with the worker's traceback as text; anything else is returned as it came."""
    if getattr(exc, "actor_init_failed", False):
        for line in reversed(str(getattr(exc, "error_msg", "") or exc).splitlines()):
            name, sep, message = line.strip().partition(": ")
            kind = getattr(errors, name.rpartition(".")[2], None) if name.startswith("edje_qdrant.errors.") else None
            if sep and isinstance(kind, type) and issubclass(kind, errors.EdjeError):
                return kind(f"a Ray worker could not start: {message}")
    return exc


def _failure(exc: UnusableFile) -> bytes:
    return msgpack.packb([exc.reason, exc.error_type, exc.kind])


def _pack_point(p: PointRecord) -> bytes:
    """A point as msgpack (data only: the driver never unpickles what workers send)."""
    return msgpack.packb({"id": p.id, "vector": list(p.vector), "payload": p.payload}, use_bin_type=True)


def _unpack_point(body: bytes) -> PointRecord:
    data = msgpack.unpackb(body, raw=False, strict_map_key=False)
    return PointRecord(id=data["id"], vector=data["vector"], payload=data["payload"])


# -------------------------------------------------------------------------------------------- driver


class RayRun(IngestRun):
    """The Ray executor's driver: lists and hashes (Ray tasks), checks the store, embeds on the actor pool, writes
    (or lets the actors write), then syncs."""

    label = "ingest on Ray"

    def __init__(self, ray: Any, settings: IngestSettings, spec: CollectionSpec, store: Any, model: Any,
                 report: IngestReport, errors: ErrorLog, opts: RayOptions, connection: dict[str, Any] | None,
                 progress: bool, prune: bool = True) -> None:
        super().__init__(settings, store, model, report, errors, prune)
        self.ray = ray
        self.spec = spec
        self.opts = opts
        self.connection = connection
        if progress:
            self.open_bar("ingest (ray)")
        self.written: set[str] = set()
        self.pending: list[PointRecord] = []

    def work(self) -> None:
        self.ray.data.DataContext.get_current().enable_progress_bars = False
        todo = self._hash_and_check()
        if todo:
            try:
                self._embed(todo)
            except self.ray.exceptions.RayActorError as exc:
                raise _worker_start_error(exc) from None
        self._write()

    # -- phase 1: list, hash (Ray tasks), drop duplicates and what the store holds
    def _list(self) -> list[dict[str, Any]]:
        listing: list[dict[str, Any]] = []
        for event in walk_images(self.settings.root):
            if isinstance(event, WalkError):
                self.walk_problem(event)
            else:
                listing.append({PATH_COLUMN: os.fsencode(event.path), FOLDER_COLUMN: event.folder})
        return listing

    def _hash_and_check(self) -> list[dict[str, Any]]:
        listing = self._list()
        if not listing:
            return []
        ctx = self.ray.data.DataContext.get_current()
        keep_order = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True  # duplicates: the first path in walk order names the point
        try:
            ds = self.ray.data.from_items(listing, override_num_blocks=max(1, len(listing) // _HASH_BATCH))
            hashed = ds.map_batches(_hash_batch, fn_kwargs={"file_timeout": self.settings.file_timeout},
                                    batch_size=_HASH_BATCH, batch_format="numpy", num_cpus=1)
            return self._check_hashed(hashed.iter_rows())
        finally:
            ctx.execution_options.preserve_order = keep_order

    def _check_hashed(self, rows: Any) -> list[dict[str, Any]]:
        """Record hash failures and duplicates, ask the store in chunks, return the files to embed."""
        todo: list[dict[str, Any]] = []
        chunk: dict[str, dict[str, Any]] = {}
        seen: set[str] = set()
        for row in rows:
            path = Path(os.fsdecode(bytes(row[PATH_COLUMN])))
            if not row["sha"]:
                self.file_failed(path, UnusableFile(str(row["reason"]), str(row["kind"]), str(row["error_type"])))
                continue
            pid = point_id(str(row["sha"]))
            self.found.setdefault(pid, []).append(walked_location(WalkItem(path, str(row[FOLDER_COLUMN]))))
            if pid in seen or pid in chunk:
                self.duplicate()
                continue
            chunk[pid] = {PATH_COLUMN: bytes(row[PATH_COLUMN]), FOLDER_COLUMN: str(row[FOLDER_COLUMN])}
            if len(chunk) >= _CHECK_CHUNK:
                seen.update(chunk)
                todo.extend(self.not_stored(chunk))
                chunk = {}
        seen.update(chunk)
        todo.extend(self.not_stored(chunk))
        return todo

    # -- phase 2: decode + embed on the actor pool; write (actors or here)
    def _embed(self, todo: list[dict[str, Any]]) -> None:
        size = self.settings.batch_size
        blocks = max(1, -(-len(todo) // size))
        ds = self.ray.data.from_items(todo, override_num_blocks=blocks)
        embedded = ds.map_batches(
            EmbedWorker,
            fn_constructor_kwargs={"model_source": self.model.source, "fingerprint": self.spec.fingerprint,
                                   # the driver's precision, so vectors match a single-process run (int8 only
                                   # changes re-ranking, which ingest does not run)
                                   "precision": "bf16" if self.model.precision == "bf16" else "fp32",
                                   "settings": self.settings,
                                   "connection": self.connection, "spec": self.spec},
            batch_size=size,
            batch_format="numpy",
            compute=self.ray.data.ActorPoolStrategy(size=min(self.opts.workers, blocks)),
            num_cpus=self.opts.cpus_per_worker,
            num_gpus=self.opts.gpus_per_worker or None,
        )
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            for outcome, pid, path, body in zip(batch["outcome"], batch["id"], batch[PATH_COLUMN], batch["body"]):
                self._record(str(outcome), str(pid), bytes(path), bytes(body))
            if len(self.pending) >= size:
                self._write()
            elif self.connection is not None and self.opts.on_batch is not None:
                self.opts.on_batch(self.report)

    def _record(self, outcome: str, pid: str, path: bytes, body: bytes) -> None:
        """Count one row a worker returned; a point it did not write itself waits in ``pending``."""
        if outcome == "failed":
            reason, error_type, kind = msgpack.unpackb(body, raw=False)
            self.file_failed(Path(os.fsdecode(path)), UnusableFile(reason, kind, error_type))
        elif outcome == "duplicate" or pid in self.written:
            self.duplicate()
        elif outcome == "written":
            self.written.add(pid)
            self.report.ingested += 1
            self.tick()
        else:  # "point": the driver writes it
            self.written.add(pid)
            point = _unpack_point(body)
            self.found.setdefault(point.id, list(point.payload[METADATA_KEY][LOCATIONS_KEY]))  # changed after hashing
            self.pending.append(point)

    def _write(self) -> None:
        if not self.pending:
            return
        points, self.pending = self.pending, []
        self.store_points(points)
        self.tick(len(points))
        if self.opts.on_batch is not None:
            self.opts.on_batch(self.report)
