"""The small store protocol; Qdrant Edge (embedded) and qdrant-client (server) implement it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Protocol, Sequence

from edje_qdrant.codec import codec_name

if TYPE_CHECKING:
    from edje_qdrant.errors import StoreError


@dataclass(frozen=True)
class CollectionSpec:
    """Collection-level record: what model and codec the stored vectors/tokens come from."""

    dim: int  # size of the `clip` vector
    model: str  # preset name or path
    fingerprint: str  # preset + weights hash
    codec: str  # e.g. "edje-tokens/v1/fp16/64x384"

    def to_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "model": self.model, "fingerprint": self.fingerprint, "codec": self.codec}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CollectionSpec":
        return cls(dim=int(d["dim"]), model=str(d["model"]), fingerprint=str(d["fingerprint"]), codec=str(d["codec"]))


def collection_spec(model: Any, dtype: str) -> CollectionSpec:
    """The spec a collection needs for ``model`` (an ``EdjeModel``: its name, fingerprint, vector width and token
    shape) with tokens stored as ``dtype``."""
    return CollectionSpec(dim=int(model.clip_dim), model=str(model.name), fingerprint=str(model.fingerprint),
                          codec=codec_name(dtype, (int(model.num_tokens), int(model.token_dim))))


@dataclass
class PointRecord:
    id: str  # UUID string
    vector: Sequence[float]  # the `clip` vector
    payload: dict[str, Any]


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)
    vector: list[float] | None = None  # the `clip` vector, only when asked for


class Store(Protocol):
    """What ingest and the Retriever need from a vector store. Vector name is always ``clip``."""

    def open_collection(self, name: str, spec: CollectionSpec, create: bool = True) -> None:
        """Create the collection (if allowed) or verify it was built with ``spec``; else ModelMismatchError."""

    def get_spec(self, name: str) -> CollectionSpec | None:
        """The recorded spec, or None when the collection does not exist."""

    def collections(self) -> list[str]:
        """Names of the collections in the store, sorted."""

    def missing_collection(self, name: str) -> "StoreError":
        """The error to raise for a collection the store does not hold (names the ones it does)."""

    def existing_ids(self, name: str, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are stored."""

    def upsert(self, name: str, points: list[PointRecord]) -> None:
        """Write points (idempotent by id); durable once it returns (flushes on Edge)."""

    def query(
        self, name: str, vector: Sequence[float], limit: int, payload_keys: list[str] | None, filter: Any = None
    ) -> list[Hit]:
        """ANN on ``clip``; payload restricted to ``payload_keys`` (None = all), best first."""

    def retrieve(self, name: str, ids: list[str], payload_keys: list[str] | None, with_vector: bool = False) -> list[Hit]:
        """Points by id (score 0), only those that exist; ``with_vector`` also returns the `clip` vector."""

    def scroll(self, name: str, payload_keys: list[str] | None, page_size: int = 1024) -> Iterator[Hit]:
        """Every point (score 0), page by page; payload restricted to ``payload_keys``."""

    def update_payloads(self, name: str, updates: Mapping[str, dict[str, Any]]) -> None:
        """Per point id, replace the given top-level payload keys (others, e.g. the token blob, stay); durable."""

    def delete(self, name: str, ids: Iterable[str]) -> None:
        """Remove points by id (ids not stored are ignored); durable once it returns."""

    def count(self, name: str) -> int: ...

    def disk_usage(self, name: str) -> int | None:
        """Bytes on disk for the collection, or None when unknown (server)."""

    def close(self) -> None: ...
