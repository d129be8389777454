"""Store on qdrant-client: a Qdrant server (gRPC preferred) or the client's local ``:memory:`` / path mode.

The model/codec record lives in the collection metadata (key ``edje``).  Servers that drop collection
metadata (Qdrant < 1.16) get a reserved point instead, which is filtered out of every query, count and
lookup.  On a server, transient failures (connection refused, timeouts, 429/502/503/504) are retried
with exponential backoff, then reported as a StoreError naming the URL (never the API key).
"""
from __future__ import annotations


import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from qdrant_client import QdrantClient, models

from edje_qdrant.errors import EdjeError, InputError, StoreError
from edje_qdrant.schema import (CAMERA_KEY, CAMERA_MAKE_KEY, CAMERA_MODEL_KEY, FOLDER_KEY, GEO_KEY, MIME_KEY, SPEC_KEY,
                                TAKEN_AT_KEY, VECTOR_NAME, canonical_id, canonical_ids, metadata_field)
from edje_qdrant.store import checks
from edje_qdrant.store.base import CollectionSpec, Hit, PointRecord
from edje_qdrant.store.filters import build_filter

log = logging.getLogger(__name__)

T = TypeVar("T")
# Reserved point carrying the spec when the server has no collection metadata; never a real image id.
SPEC_POINT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "https://edje-qdrant/collection-spec"))
_GRPC_TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}
_HTTP_TRANSIENT = {408, 429, 500, 502, 503, 504}
_INDEXES = {
    **{metadata_field(key): models.PayloadSchemaType.KEYWORD
       for key in (FOLDER_KEY, CAMERA_KEY, CAMERA_MAKE_KEY, CAMERA_MODEL_KEY, MIME_KEY)},
    metadata_field(TAKEN_AT_KEY): models.PayloadSchemaType.DATETIME,
    metadata_field(GEO_KEY): models.PayloadSchemaType.GEO,
}


@dataclass(frozen=True)
class CollectionOptions:
    """Layout of a collection created on a Qdrant server (None = the server's default).

    Applied only when edje-qdrant creates the collection: Qdrant fixes the shard count at creation, so an
    existing collection keeps its layout (a warning says so when options were given).
    """

    shards: int | None = None  # shard_number: spread the points over this many shards (nodes)
    replication: int | None = None  # replication_factor: copies of each shard
    on_disk_payload: bool | None = None  # keep payloads (the token blobs) on disk, read when asked for
    on_disk_vectors: bool | None = None  # memory-map the `clip` vectors instead of holding them in RAM
    on_disk_index: bool | None = None  # keep the HNSW graph on disk
    quantization: str | None = None  # "int8": a scalar-quantized copy of the `clip` vectors pinned in RAM

    def __post_init__(self) -> None:
        for field in ("shards", "replication"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"collection option {field} must be a positive integer, got {value!r}")
        if self.quantization not in (None, "int8"):
            raise InputError(f"collection option quantization must be 'int8' or None, got {self.quantization!r}")

    def is_default(self) -> bool:
        return all(v is None for v in asdict(self).values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def create_collection_args(spec: CollectionSpec, options: CollectionOptions | None,
                           use_metadata: bool = True) -> dict[str, Any]:
    """Keyword arguments of ``QdrantClient.create_collection`` for an edje collection laid out by ``options``."""
    layout = options or CollectionOptions()
    vectors = {VECTOR_NAME: models.VectorParams(size=spec.dim, distance=models.Distance.COSINE,
                                                on_disk=layout.on_disk_vectors)}
    args: dict[str, Any] = dict(vectors_config=vectors, metadata={SPEC_KEY: spec.to_dict()} if use_metadata else None)
    if layout.shards is not None:
        args["shard_number"] = layout.shards
    if layout.replication is not None:
        args["replication_factor"] = layout.replication
    if layout.on_disk_payload is not None:
        args["on_disk_payload"] = layout.on_disk_payload
    if layout.on_disk_index is not None:
        args["hnsw_config"] = models.HnswConfigDiff(on_disk=layout.on_disk_index)
    if layout.quantization == "int8":
        args["quantization_config"] = models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True))
    return args


class ClientStore:
    """The ``Store`` protocol on a ``QdrantClient`` (remote server or local mode)."""

    def __init__(
        self,
        client: QdrantClient,
        *,
        url: str | None = None,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        batch_size: int = 64,
        batch_bytes: int = 3 * 1024 * 1024,
        spec_record: str = "auto",
        collection_options: CollectionOptions | None = None,
    ) -> None:
        """``url`` only labels messages; ``spec_record`` is "auto", "metadata" or "point" (tests force "point");
        ``collection_options`` lay out the collections this store creates (shards, replicas, on-disk parts)."""
        if spec_record not in ("auto", "metadata", "point"):
            raise InputError(f"spec_record must be 'auto', 'metadata' or 'point', got {spec_record!r}")
        self.client = client
        self.local = type(client._client).__name__ == "QdrantLocal"
        self.where = _describe(client, url)
        self.retries = max(1, int(retries)) if not self.local else 1
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.batch_size = max(1, int(batch_size))
        self.batch_bytes = max(1, int(batch_bytes))
        self._spec_record = spec_record
        self.collection_options = collection_options or CollectionOptions()
        self._specs: dict[str, tuple[CollectionSpec, bool]] = {}  # name -> (spec, stored as reserved point)
        self._mutex = threading.RLock()
        # Local mode is plain Python over dicts/sqlite: serialise calls.  Remote calls run in parallel.
        self._local_lock = threading.RLock() if self.local else None

    # ------------------------------------------------------------------ calls with retries

    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one client call; retry transient server errors with exponential backoff."""
        delay = self.backoff_s
        for attempt in range(1, self.retries + 1):
            try:
                if self._local_lock is not None:
                    with self._local_lock:
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            except EdjeError:
                raise
            except Exception as e:  # qdrant-client raises many unrelated types
                if not is_transient(e) or self.local:
                    raise StoreError(f"Qdrant {self.where}: {what} failed: {_reason(e)}") from e
                if attempt == self.retries:
                    raise StoreError(
                        f"Qdrant at {self.where} is unreachable: {what} failed {self.retries} times "
                        f"(last error: {_reason(e)}). Check that the server is running and that --url / "
                        "QDRANT_URL points at it (gRPC uses port 6334 unless told otherwise)."
                    ) from e
                log.warning("Qdrant at %s: %s failed (%s); retry %d/%d in %.2fs",
                            self.where, what, _reason(e), attempt, self.retries - 1, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ collection record

    def get_spec(self, name: str) -> CollectionSpec | None:
        """The recorded spec, or None when the collection does not exist."""
        found = self._read_spec(name)
        return None if found is None else found[0]

    def _read_spec(self, name: str) -> tuple[CollectionSpec, bool] | None:
        checks.check_collection_name(name)
        if not self._call(f"checking collection {name!r}", self.client.collection_exists, name):
            return None
        info = self._call(f"reading collection {name!r}", self.client.get_collection, name)
        _check_vectors(name, self.where, info)
        meta = getattr(info.config, "metadata", None) or {}
        if self._spec_record != "point" and SPEC_KEY in meta:
            return _parse_spec(name, self.where, meta[SPEC_KEY]), False
        records = self._call(f"reading the edje record of {name!r}", self.client.retrieve, name,
                             [SPEC_POINT_ID], with_payload=True, with_vectors=False)
        if records and SPEC_KEY in (records[0].payload or {}):
            return _parse_spec(name, self.where, records[0].payload[SPEC_KEY]), True
        raise StoreError(
            f"collection {name!r} on Qdrant {self.where} exists but was not created by edje-qdrant "
            "(no model record); pick another --collection"
        )

    def open_collection(self, name: str, spec: CollectionSpec, create: bool = True) -> None:
        """Create the collection (if allowed) or verify it was built with ``spec``; else ModelMismatchError."""
        checks.check_spec(spec)
        with self._mutex:
            found = self._read_spec(name)
            if found is not None:
                checks.verify_spec(name, f"Qdrant {self.where}", found[0], spec)
                self._specs[name] = found
                if not self.collection_options.is_default():
                    log.warning("collection %r on Qdrant %s exists: it keeps its layout (shards, replicas and "
                                "on-disk options apply only when a collection is created)", name, self.where)
                return
            if not create:
                raise self._missing(name)
            try:
                self._create(name, spec)
            except StoreError:
                # Another client may have created it first, or a retried create already succeeded.
                found = self._read_spec(name)
                if found is None:
                    raise
                checks.verify_spec(name, f"Qdrant {self.where}", found[0], spec)
                self._specs[name] = found

    def _create(self, name: str, spec: CollectionSpec) -> None:
        use_metadata = self._spec_record != "point"
        self._call(
            f"creating collection {name!r}",
            self.client.create_collection,
            name,
            **create_collection_args(spec, self.collection_options, use_metadata),
        )
        if use_metadata:
            info = self._call(f"reading collection {name!r}", self.client.get_collection, name)
            use_metadata = SPEC_KEY in (getattr(info.config, "metadata", None) or {})
            if not use_metadata:
                log.info("Qdrant %s keeps no collection metadata; recording the model in a reserved point", self.where)
        if not use_metadata:
            vec = [1.0] + [0.0] * (spec.dim - 1)
            point = models.PointStruct(id=SPEC_POINT_ID, vector={VECTOR_NAME: vec}, payload={SPEC_KEY: spec.to_dict()})
            self._call(f"recording the model in {name!r}", self.client.upsert, name, [point], wait=True)
        if not self.local:
            for field, schema in _INDEXES.items():
                self._call(f"indexing {field} in {name!r}", self.client.create_payload_index, name, field, schema,
                           wait=True)
        self._specs[name] = (spec, not use_metadata)
        log.info("created collection %r on Qdrant %s (model %s)", name, self.where, spec.model)

    def collections(self) -> list[str]:
        """Names of the collections on this Qdrant (any, not only edje-qdrant's), sorted."""
        found = self._call("listing collections", self.client.get_collections)
        return sorted(c.name for c in found.collections)

    def missing_collection(self, name: str) -> StoreError:
        """The error for a collection this Qdrant does not hold, naming those it does."""
        return checks.missing_collection(name, f"Qdrant {self.where}", self.collections(), "--url")

    _missing = missing_collection

    def _spec(self, name: str) -> tuple[CollectionSpec, bool]:
        with self._mutex:
            found = self._specs.get(name)
            if found is None:
                found = self._read_spec(name)
                if found is None:
                    raise self._missing(name)
                self._specs[name] = found
            return found

    # ------------------------------------------------------------------ data

    def upsert(self, name: str, points: list[PointRecord]) -> None:
        """Write points in batches (each retried on transient errors); acknowledged writes (wait=True)."""
        spec, _ = self._spec(name)
        structs = []
        for p in points:
            pid = canonical_id(p.id)
            if pid == SPEC_POINT_ID:
                raise InputError(f"point id {p.id} is reserved by edje-qdrant for the collection record")
            vec = checks.check_vector(p.vector, spec.dim, f"point {p.id}")
            structs.append(models.PointStruct(id=pid, vector={VECTOR_NAME: vec}, payload=dict(p.payload or {})))
        for batch in _batches(structs, self.batch_size, self.batch_bytes):
            self._call(
                f"upserting {len(batch)} points ({batch[0].id}..) into {name!r}",
                self.client.upsert, name, batch, wait=True,
            )

    def query(
        self, name: str, vector: Sequence[float], limit: int, payload_keys: list[str] | None, filter: Any = None
    ) -> list[Hit]:
        """Cosine search on ``clip``, best first, payload restricted to ``payload_keys`` in the same call."""
        checks.check_limit(limit)
        flt = build_filter(filter)
        spec, spec_point = self._spec(name)
        vec = checks.check_vector(vector, spec.dim, "query")
        if spec_point:
            flt = _without_spec_point(flt)
        res = self._call(
            f"query on {name!r}", self.client.query_points, name, query=vec, using=VECTOR_NAME, limit=limit,
            query_filter=flt, with_payload=checks.payload_selector(payload_keys), with_vectors=False,
        )
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in res.points]

    def retrieve(self, name: str, ids: list[str], payload_keys: list[str] | None, with_vector: bool = False) -> list[Hit]:
        """Points by id (score 0) in the order asked, only those that exist."""
        wanted = canonical_ids(ids)
        wanted.pop(SPEC_POINT_ID, None)
        by_id = {str(r.id): r for r in self._retrieve(name, list(wanted), checks.payload_selector(payload_keys), with_vector)}
        return [Hit(id=cid, score=0.0, payload=dict(by_id[cid].payload or {}),
                    vector=checks.clip_vector(by_id[cid]) if with_vector else None)
                for cid in wanted if cid in by_id]

    def existing_ids(self, name: str, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are stored (returned as the caller spelled them)."""
        wanted = canonical_ids(ids)
        wanted.pop(SPEC_POINT_ID, None)
        keys = list(wanted)
        found: set[str] = set()
        for start in range(0, len(keys), 1024):
            found.update(str(r.id) for r in self._retrieve(name, keys[start:start + 1024], False))
        return {wanted[cid] for cid in found if cid in wanted}

    def _retrieve(self, name: str, ids: list[str], selector: bool | list[str], with_vector: bool = False) -> list[Any]:
        self._spec(name)
        if not ids:
            return []
        return self._call(f"retrieve from {name!r}", self.client.retrieve, name, ids,
                          with_payload=selector, with_vectors=with_vector)

    def scroll(self, name: str, payload_keys: list[str] | None, page_size: int = 1024) -> Iterator[Hit]:
        """Every point (score 0), ``page_size`` per call; payload restricted to ``payload_keys``."""
        checks.check_limit(page_size)
        _, spec_point = self._spec(name)
        flt = _without_spec_point(None) if spec_point else None
        selector = checks.payload_selector(payload_keys)
        offset: Any = None
        while True:
            records, offset = self._call(f"scroll over {name!r}", self.client.scroll, name, scroll_filter=flt,
                                         limit=page_size, offset=offset, with_payload=selector, with_vectors=False)
            for r in records:
                yield Hit(id=str(r.id), score=0.0, payload=dict(r.payload or {}))
            if offset is None or not records:
                return

    def update_payloads(self, name: str, updates: Mapping[str, dict[str, Any]]) -> None:
        """Per point id, replace the given top-level payload keys (the token blob is not resent); acknowledged."""
        self._spec(name)
        ops = []
        for pid, payload in updates.items():
            cid = canonical_id(pid)
            if cid == SPEC_POINT_ID:
                raise InputError(f"point id {pid} is reserved by edje-qdrant for the collection record")
            ops.append(models.SetPayloadOperation(set_payload=models.SetPayload(payload=dict(payload), points=[cid])))
        for start in range(0, len(ops), self.batch_size):
            batch = ops[start:start + self.batch_size]
            self._call(f"updating the payload of {len(batch)} points in {name!r}", self.client.batch_update_points,
                       name, batch, wait=True)

    def delete(self, name: str, ids: Iterable[str]) -> None:
        """Remove points by id (ids not stored are ignored); acknowledged (wait=True)."""
        self._spec(name)
        keys = [cid for cid in canonical_ids(ids) if cid != SPEC_POINT_ID]
        for start in range(0, len(keys), 1024):
            batch = keys[start:start + 1024]
            self._call(f"deleting {len(batch)} points from {name!r}", self.client.delete, name,
                       models.PointIdsList(points=batch), wait=True)

    def count(self, name: str) -> int:
        _, spec_point = self._spec(name)
        flt = _without_spec_point(None) if spec_point else None
        res = self._call(f"count on {name!r}", self.client.count, name, count_filter=flt, exact=True)
        return int(res.count)

    def disk_usage(self, name: str) -> int | None:
        """Unknown for a server (and for local mode)."""
        self._spec(name)
        return None

    def collection_layout(self, name: str) -> dict[str, Any]:
        """Shards, replicas and on-disk options as the server reports them (None: not reported, server default)."""
        self._spec(name)
        info = self._call(f"reading collection {name!r}", self.client.get_collection, name)
        params = info.config.params
        vectors = params.vectors.get(VECTOR_NAME) if isinstance(params.vectors, dict) else None
        hnsw = getattr(info.config, "hnsw_config", None)
        quant = getattr(info.config, "quantization_config", None)
        scalar = getattr(quant, "scalar", None)
        return {
            "shards": params.shard_number,
            "replication": params.replication_factor,
            "on_disk_payload": params.on_disk_payload,
            "on_disk_vectors": getattr(vectors, "on_disk", None),
            "on_disk_index": getattr(hnsw, "on_disk", None),
            "quantization": "int8" if scalar is not None and scalar.type == models.ScalarType.INT8 else
            (type(quant).__name__ if quant is not None else None),
        }

    def connection(self) -> dict[str, Any] | None:
        """``QdrantClient`` keyword arguments that reach the same server from another process (ingest workers);
        None in local mode, which only this process can use. Holds the API key: never log it."""
        if self.local:
            return None
        opts = dict(getattr(self.client, "init_options", {}) or {})
        keep = ("url", "host", "port", "grpc_port", "prefer_grpc", "https", "api_key", "prefix", "timeout")
        return {k: opts[k] for k in keep if opts.get(k) is not None}

    def close(self) -> None:
        try:
            self.client.close()
        except Exception as e:
            log.warning("closing the Qdrant client for %s failed: %s", self.where, _reason(e))


def is_transient(e: BaseException) -> bool:
    """Connection refused, timeouts, overload: worth retrying."""
    code = getattr(e, "code", None)
    if callable(code):  # grpc.RpcError
        try:
            return getattr(code(), "name", "") in _GRPC_TRANSIENT
        except Exception:
            return False
    name = type(e).__name__
    if name in ("ResponseHandlingException", "ResourceExhaustedResponse"):
        return True
    status = getattr(e, "status_code", None)
    if isinstance(status, int):
        return status in _HTTP_TRANSIENT
    return isinstance(e, (ConnectionError, TimeoutError)) or name in ("ConnectError", "ReadTimeout", "ConnectTimeout")


def _reason(e: BaseException) -> str:
    """A one-line reason, short, without request headers."""
    details = getattr(e, "details", None)
    text = details() if callable(details) else str(e)
    text = " ".join(str(text).split()) or type(e).__name__
    return text[:300]


def _describe(client: QdrantClient, url: str | None) -> str:
    """Where the client points, for messages: a URL without credentials, or the local location."""
    opts = getattr(client, "init_options", {}) or {}
    if url is None:
        if opts.get("location") == ":memory:":
            return "local :memory:"
        if opts.get("path"):
            return f"local path {opts['path']}"
        url = opts.get("url") or opts.get("location") or (f"{opts.get('host')}:{opts.get('port')}" if opts.get("host")
                                                           else "local")
    return checks.redact_url(str(url))


def _check_vectors(name: str, where: str, info: Any) -> None:
    vectors = info.config.params.vectors
    params = vectors.get(VECTOR_NAME) if isinstance(vectors, dict) else None
    if params is None or params.distance != models.Distance.COSINE:
        raise StoreError(
            f"collection {name!r} on Qdrant {where} has no cosine vector named {VECTOR_NAME!r}; it was not "
            "created by edje-qdrant: pick another --collection"
        )


def _parse_spec(name: str, where: str, raw: Any) -> CollectionSpec:
    try:
        return CollectionSpec.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"the edje record of collection {name!r} on Qdrant {where} is damaged ({e!r})") from e


def _without_spec_point(flt: models.Filter | None) -> models.Filter:
    exclude = models.HasIdCondition(has_id=[SPEC_POINT_ID])
    if flt is None:
        return models.Filter(must_not=[exclude])
    return models.Filter(must=[flt], must_not=[exclude])


def _batches(points: list[models.PointStruct], max_count: int, max_bytes: int) -> Iterable[list[models.PointStruct]]:
    """Split by count and by rough payload size (gRPC messages have a size cap)."""
    batch: list[models.PointStruct] = []
    size = 0
    for p in points:
        n = len(json.dumps(p.payload, default=str)) + 8 * len(p.vector[VECTOR_NAME]) + 64
        if batch and (len(batch) >= max_count or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += n
    if batch:
        yield batch
