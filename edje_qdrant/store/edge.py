"""Embedded store on Qdrant Edge: one shard folder per collection, single process, durable upserts.

Layout under the store path::

    <path>/.edje-store.lock              fcntl lock held while an EdgeStore is open (one process at a time)
    <path>/<collection>/edje-collection.json   model/codec record (written atomically)
    <path>/<collection>/shard/           the Qdrant Edge shard (named dense vector ``clip``, cosine)
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import qdrant_edge as qe

from edje_qdrant.errors import StoreError, StoreLockedError
from edje_qdrant.schema import (CAMERA_MODEL_KEY, FOLDER_KEY, MIME_KEY, TAKEN_AT_KEY, VECTOR_NAME, canonical_id,
                                canonical_ids, metadata_field)
from edje_qdrant.store import checks
from edje_qdrant.store.base import CollectionSpec, Hit, PointRecord
from edje_qdrant.store.edge_filters import to_edge_filter

log = logging.getLogger(__name__)

LOCK_NAME = ".edje-store.lock"
SPEC_FILE = "edje-collection.json"
SHARD_DIR = "shard"
_FORMAT = 1
# The most used filter fields, indexed so filtered search stays fast on big collections (each index
# costs ~0.15 s at creation, so only these; other fields are filtered by a scan, same results).
_INDEXES = {
    metadata_field(FOLDER_KEY): "Keyword",
    metadata_field(MIME_KEY): "Keyword",
    metadata_field(CAMERA_MODEL_KEY): "Keyword",
    metadata_field(TAKEN_AT_KEY): "Datetime",
}


class _Collection:
    def __init__(self, name: str, spec: CollectionSpec, shard: Any) -> None:
        self.name = name
        self.spec = spec
        self.shard = shard
        self.write_lock = threading.Lock()  # one writer at a time; queries run alongside


class EdgeStore:
    """The ``Store`` protocol on an embedded Qdrant Edge store at ``path`` (one process at a time)."""

    def __init__(self, path: str | os.PathLike[str] = "./edje-data", *, batch_size: int = 64,
                 create: bool = True) -> None:
        """``create=False`` (read-only commands): a path that holds no store is an error, and nothing is created."""
        self.path = Path(path).expanduser().absolute()
        self.batch_size = max(1, int(batch_size))
        if not create:
            _require_existing_store(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store folder {self.path}: {e.strerror}; pass a writable --store") from e
        self._lock_fd: int | None = _acquire_lock(self.path)
        # A store dropped without close() still gives its lock back.
        self._release_lock = weakref.finalize(self, os.close, self._lock_fd)
        self._collections: dict[str, _Collection] = {}
        self._cond = threading.Condition(threading.Lock())  # guards the dict, open/close, active count
        self._active = 0
        self._closed = False

    # ------------------------------------------------------------------ collection record

    def _dir(self, name: str) -> Path:
        return self.path / checks.check_collection_name(name)

    def get_spec(self, name: str) -> CollectionSpec | None:
        """The recorded spec, or None when the collection does not exist."""
        spec_path = self._dir(name) / SPEC_FILE
        try:
            raw = spec_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read {spec_path}: {e.strerror}") from e
        try:
            return CollectionSpec.from_dict(json.loads(raw)["spec"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(
                f"collection record {spec_path} is damaged ({e!r}); restore it from a backup or re-ingest "
                "into a new --collection"
            ) from e

    def open_collection(self, name: str, spec: CollectionSpec, create: bool = True) -> None:
        """Create the collection (if allowed) or verify it was built with ``spec``; else ModelMismatchError."""
        checks.check_spec(spec)
        with self._cond:
            self._check_open()
            recorded = self.get_spec(name)
            if recorded is not None:
                checks.verify_spec(name, f"store {self.path}", recorded, spec)
                if name not in self._collections:
                    self._collections[name] = self._load(name, recorded)
                return
            if not create:
                raise self._missing(name)
            cdir = self._dir(name)
            try:
                cdir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create collection folder {cdir}: {e.strerror}; pass a writable --store") from e
            # Record first, shard second: a crash in between leaves a record with no shard, which
            # _load() turns into an empty shard, never a shard nobody can verify.
            _write_json_atomic(cdir / SPEC_FILE, {"format": _FORMAT, "vector": VECTOR_NAME, "distance": "cosine",
                                                   "spec": spec.to_dict()})
            self._collections[name] = self._load(name, spec)
            log.info("created collection %r in %s (model %s)", name, self.path, spec.model)

    def collections(self) -> list[str]:
        """Names of the collections in this store, sorted."""
        try:
            return sorted(d.name for d in self.path.iterdir() if (d / SPEC_FILE).is_file())
        except OSError as e:
            raise StoreError(f"cannot list store folder {self.path}: {e.strerror}") from e

    def missing_collection(self, name: str) -> StoreError:
        """The error for a collection this store does not hold, naming those it does."""
        return checks.missing_collection(name, f"store {self.path}", self.collections(), "--store")

    _missing = missing_collection

    def _load(self, name: str, spec: CollectionSpec) -> _Collection:
        shard_dir = self._dir(name) / SHARD_DIR
        try:
            if (shard_dir / "edge_config.json").exists():
                shard = qe.EdgeShard.load(str(shard_dir))
            else:
                if shard_dir.exists():  # a create cut short by a crash: no point was ever written there
                    log.warning("removing the unfinished shard %s and creating it again", shard_dir)
                    shutil.rmtree(shard_dir)
                params = qe.EdgeVectorParams(size=spec.dim, distance=qe.Distance.Cosine)
                cfg = qe.EdgeConfig(vectors={VECTOR_NAME: params})
                shard = qe.EdgeShard.create(str(shard_dir), cfg)
                for field, kind in _INDEXES.items():
                    shard.update(qe.UpdateOperation.create_field_index(field, getattr(qe.PayloadSchemaType, kind)))
                shard.flush()
        except Exception as e:  # qdrant_edge raises plain Exception
            raise StoreError(f"cannot open Qdrant Edge shard {shard_dir}: {e}") from e
        return _Collection(name, spec, shard)

    # ------------------------------------------------------------------ lifetime / concurrency

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")

    @contextlib.contextmanager
    def _use(self, name: str) -> Iterator[_Collection]:
        """The opened collection (loaded on first use); close() waits until every user is done."""
        with self._cond:
            self._check_open()
            coll = self._collections.get(name)
            if coll is None:
                recorded = self.get_spec(name)
                if recorded is None:
                    raise self._missing(name)
                coll = self._collections[name] = self._load(name, recorded)
            self._active += 1
        try:
            yield coll
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Flush and close every shard, then release the store lock. Safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._active:
                self._cond.wait()
            errors = []
            for coll in self._collections.values():
                try:
                    coll.shard.flush()
                    coll.shard.close()
                except Exception as e:  # keep closing the others
                    errors.append(f"{coll.name}: {e}")
            self._collections.clear()
            self._release_lock()  # closing the descriptor drops the flock
            self._lock_fd = None
        if errors:
            raise StoreError(f"closing store {self.path} failed: {'; '.join(errors)}")

    def __enter__(self) -> "EdgeStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ data

    def upsert(self, name: str, points: list[PointRecord]) -> None:
        """Write points (idempotent by id); flushed to disk before returning."""
        with self._use(name) as coll:
            dim = coll.spec.dim
            edge_points = [
                qe.Point(canonical_id(p.id), {VECTOR_NAME: checks.check_vector(p.vector, dim, f"point {p.id}")},
                         dict(p.payload or {}))
                for p in points
            ]
            if not edge_points:
                return
            with coll.write_lock:
                for start in range(0, len(edge_points), self.batch_size):
                    chunk = edge_points[start:start + self.batch_size]
                    try:
                        coll.shard.update(qe.UpdateOperation.upsert_points(chunk))
                    except Exception as e:
                        raise StoreError(
                            f"Qdrant Edge could not write points {chunk[0].id}..{chunk[-1].id} to collection "
                            f"{name!r} in {self.path}: {e}"
                        ) from e
                try:
                    coll.shard.flush()
                except Exception as e:
                    raise StoreError(f"flushing collection {name!r} in {self.path} failed: {e}") from e

    def query(
        self, name: str, vector: Sequence[float], limit: int, payload_keys: list[str] | None, filter: Any = None
    ) -> list[Hit]:
        """Cosine search on ``clip``, best first, payload restricted to ``payload_keys`` in the same call."""
        checks.check_limit(limit)
        edge_filter = to_edge_filter(filter)
        selector = checks.payload_selector(payload_keys)
        with self._use(name) as coll:
            vec = checks.check_vector(vector, coll.spec.dim, "query")
            request = qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(vec, using=VECTOR_NAME),
                with_payload=selector,
                with_vector=False,
                filter=edge_filter,
            )
            try:
                found = coll.shard.query(request)
            except Exception as e:
                raise StoreError(f"query on collection {name!r} in {self.path} failed: {e}") from e
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in found]

    def retrieve(self, name: str, ids: list[str], payload_keys: list[str] | None, with_vector: bool = False) -> list[Hit]:
        """Points by id (score 0) in the order asked, only those that exist."""
        wanted = canonical_ids(ids)
        records = self._retrieve(name, list(wanted), checks.payload_selector(payload_keys), with_vector)
        by_id = {str(r.id): r for r in records}
        return [Hit(id=cid, score=0.0, payload=dict(by_id[cid].payload or {}),
                    vector=checks.clip_vector(by_id[cid]) if with_vector else None)
                for cid in wanted if cid in by_id]

    def existing_ids(self, name: str, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are stored (returned as the caller spelled them)."""
        wanted = canonical_ids(ids)
        found: set[str] = set()
        keys = list(wanted)
        for start in range(0, len(keys), 1024):
            found.update(str(r.id) for r in self._retrieve(name, keys[start:start + 1024], False))
        return {wanted[cid] for cid in found if cid in wanted}

    def _retrieve(self, name: str, ids: list[str], selector: bool | list[str], with_vector: bool = False) -> list[Any]:
        with self._use(name) as coll:
            if not ids:
                return []
            try:
                return coll.shard.retrieve([uuid.UUID(i) for i in ids], with_payload=selector, with_vector=with_vector)
            except Exception as e:
                raise StoreError(f"retrieve from collection {name!r} in {self.path} failed: {e}") from e

    def scroll(self, name: str, payload_keys: list[str] | None, page_size: int = 1024) -> Iterator[Hit]:
        """Every point (score 0) in id order, ``page_size`` per shard call; payload restricted to ``payload_keys``."""
        checks.check_limit(page_size)
        selector = checks.payload_selector(payload_keys)
        offset: Any = None
        while True:
            with self._use(name) as coll:
                try:
                    records, offset = coll.shard.scroll(
                        qe.ScrollRequest(offset=offset, limit=page_size, with_payload=selector, with_vector=False))
                except Exception as e:
                    raise StoreError(f"scroll over collection {name!r} in {self.path} failed: {e}") from e
            for r in records:
                yield Hit(id=str(r.id), score=0.0, payload=dict(r.payload or {}))
            if offset is None or not records:
                return

    def update_payloads(self, name: str, updates: Mapping[str, dict[str, Any]]) -> None:
        """Per point id, replace the given top-level payload keys (the token blob is not rewritten); flushed."""
        ops = [qe.UpdateOperation.set_payload([uuid.UUID(canonical_id(pid))], dict(payload))
               for pid, payload in updates.items()]
        self._write(name, ops, "update the payload of")

    def delete(self, name: str, ids: Iterable[str]) -> None:
        """Remove points by id (ids not stored are ignored); flushed to disk before returning."""
        keys = [uuid.UUID(cid) for cid in canonical_ids(ids)]
        ops = [qe.UpdateOperation.delete_points(keys[i:i + self.batch_size])
               for i in range(0, len(keys), self.batch_size)]
        self._write(name, ops, "delete")

    def _write(self, name: str, ops: list[Any], what: str) -> None:
        """Apply update operations under the write lock, then flush once."""
        if not ops:
            return
        with self._use(name) as coll, coll.write_lock:
            for op in ops:
                try:
                    coll.shard.update(op)
                except Exception as e:
                    raise StoreError(f"Qdrant Edge could not {what} points in collection {name!r} in {self.path}: "
                                     f"{e}") from e
            try:
                coll.shard.flush()
            except Exception as e:
                raise StoreError(f"flushing collection {name!r} in {self.path} failed: {e}") from e

    def count(self, name: str) -> int:
        with self._use(name) as coll:
            try:
                return int(coll.shard.count(qe.CountRequest(exact=True)))
            except Exception as e:
                raise StoreError(f"count on collection {name!r} in {self.path} failed: {e}") from e

    def disk_usage(self, name: str) -> int | None:
        """Bytes allocated on disk by the collection folder (shard files are sparse, so not their sizes)."""
        cdir = self._dir(name)
        if not (cdir / SPEC_FILE).exists():
            raise self._missing(name)
        total = 0
        for root, _dirs, files in os.walk(cdir):
            for f in files:
                try:
                    st = os.stat(os.path.join(root, f))
                except FileNotFoundError:  # a segment replaced while we walk
                    continue
                total += getattr(st, "st_blocks", 0) * 512 or st.st_size
        return total

    def optimize(self, name: str) -> bool:
        """Merge segments and build the HNSW index (Edge does not do it in the background); True if it did work."""
        with self._use(name) as coll, coll.write_lock:
            try:
                return bool(coll.shard.optimize())
            except Exception as e:
                raise StoreError(f"optimizing collection {name!r} in {self.path} failed: {e}") from e


# ---------------------------------------------------------------------- files


def _require_existing_store(path: Path) -> None:
    """StoreError unless ``path`` is a store folder (its lock file or a collection record is there)."""
    fix = f"run `edje-qdrant ingest DIR --store {path}` first, or pass the --store (EDJE_STORE) you ingested into"
    if not path.is_dir():
        raise StoreError(f"no store at {path}: the folder does not exist; {fix}")
    if (path / LOCK_NAME).is_file():
        return
    try:
        if any((child / SPEC_FILE).is_file() for child in path.iterdir() if child.is_dir()):
            return
    except OSError as e:
        raise StoreError(f"cannot read store folder {path}: {e.strerror}") from e
    raise StoreError(f"no store at {path}: the folder holds no edje-qdrant collection; {fix}")


def _acquire_lock(path: Path) -> int:
    """Take an exclusive flock on ``<path>/.edje-store.lock``; held until the descriptor is closed."""
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(f"cannot create lock file {lock_path}: {e.strerror}; pass a writable --store") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreError(f"cannot lock {lock_path}: {e.strerror}") from e
        who = "this process" if holder == str(os.getpid()) else (f"process {holder}" if holder else "another process")
        raise StoreLockedError(
            f"store {path} is already open by {who}. The embedded Qdrant Edge store allows one process at a time: "
            "wait for the other edje-qdrant command to finish, or run a Qdrant server and pass --url "
            "(or QDRANT_URL) for concurrent access."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"cannot write {path}: {e.strerror}") from e
