"""The point and query rules, in one place.

What a stored point holds (vector name, payload keys, ids), the collection spec a model needs, what a search may
ask for (argument limits) and how filters are written. Ingest, the stores, the Retriever, the HTTP service (its
OpenAPI constraints are generated from ``QueryLimits``), the CLI and the integrations all read them from here.
Light on purpose: no torch, no qdrant-client at import.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from edje_qdrant.errors import InputError

# ------------------------------------------------------------------------------------------------ points
VECTOR_NAME = "clip"  # the one named vector: the global (first-stage) embedding, cosine distance
SPEC_KEY = "edje"  # the collection spec in collection metadata / the reserved point's payload
TOKENS_KEY = "edje_tokens"  # the compressed image tokens (codec blob)
MODEL_KEY = "edje_model"  # fingerprint of the model that wrote the point
PAGE_CONTENT_KEY = "page_content"  # caption (NAME.txt beside the image) or the file name; LangChain's field
METADATA_KEY = "metadata"  # path, size, EXIF... (LangChain's field)
SOURCE_KEY = "source"  # metadata: the image's path (the first of its locations)
LOCATIONS_KEY = "locations"  # metadata: every path this content was found at ([{source, folder}])
RESULT_PAYLOAD_KEYS = (PAGE_CONTENT_KEY, METADATA_KEY)  # what a search result carries
POINT_NAMESPACE = uuid.UUID("6f1c2b0e-5d3a-4e8f-9a47-3b2d8c1e7f05")  # never change: it names every stored point


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


def point_payload(page_content: str, metadata: Mapping[str, Any], token_blob: str, fingerprint: str
                  ) -> dict[str, Any]:
    """The payload of one stored image."""
    return {PAGE_CONTENT_KEY: page_content, METADATA_KEY: dict(metadata), TOKENS_KEY: token_blob,
            MODEL_KEY: fingerprint}


def collection_spec(model: Any, dtype: str) -> Any:
    """The ``CollectionSpec`` a collection needs for ``model`` with tokens stored as ``dtype``."""
    from edje_qdrant.codec import codec_name
    from edje_qdrant.store.base import CollectionSpec

    return CollectionSpec(dim=int(model.clip_dim), model=str(model.name), fingerprint=str(model.fingerprint),
                          codec=codec_name(dtype, (int(model.num_tokens), int(model.token_dim))))


# ------------------------------------------------------------------------------------------------ queries
@dataclass(frozen=True)
class QueryLimits:
    """What one search may ask for. The library allows a lot; a service sets its own (``ServiceLimits``)."""

    max_k: int = 10_000
    max_rerank_k: int = 10_000
    max_query_chars: int = 10_000


LIBRARY_LIMITS = QueryLimits()
# A query must hold a character outside this set: Python's whitespace and JSON Schema's (ECMA) \s together, so the
# HTTP schema's pattern (NOT_BLANK_PATTERN) and check_query agree on every string.
BLANK_CHARS = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B))
               + "\u2028\u2029\u202f\u205f\u3000\ufeff")
NOT_BLANK_PATTERN = "[^" + BLANK_CHARS + "]"


def check_query(query: Any, limits: QueryLimits = LIBRARY_LIMITS) -> str:
    """A search text: a non-blank string within the length limit, valid Unicode. Returns it."""
    if not isinstance(query, str):
        raise _bad("query", f"query must be a string, got {type(query).__name__}")
    if all(c in BLANK_CHARS for c in query):
        raise _bad("query", "query is empty; pass some text to search for")
    if len(query) > limits.max_query_chars:
        raise _bad("query", f"query has {len(query)} characters; the limit is {limits.max_query_chars}")
    try:  # lone surrogates (e.g. undecodable command-line bytes) would crash the tokenizer
        query.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad("query", f"query is not valid Unicode text (character {exc.start} is a lone surrogate, e.g. from "
                         "bytes that are not UTF-8); pass UTF-8 text") from None
    return query


def check_counts(k: Any, rerank_k: Any, limits: QueryLimits = LIBRARY_LIMITS) -> None:
    """``k`` results (1..max_k) from ``rerank_k`` re-ranked candidates (0 = no re-ranking, else k..max_rerank_k)."""
    for name, value, cap in (("k", k, limits.max_k), ("rerank_k", rerank_k, limits.max_rerank_k)):
        if isinstance(value, bool) or not _is_int(value):
            raise _bad(name, f"{name} must be an integer, got {value!r}")
        if value > cap:
            raise _bad(name, f"{name}={value} is above the limit of {cap}")
    if k <= 0:
        raise _bad("k", f"k must be at least 1, got {k}")
    if rerank_k < 0:
        raise _bad("rerank_k", f"rerank_k must be 0 (no re-ranking) or positive, got {rerank_k}")
    if rerank_k and k > rerank_k:
        raise _bad("k", f"k={k} is larger than rerank_k={rerank_k}; raise rerank_k to at least k, or set rerank_k=0")


def check_search_args(query: Any, k: Any, rerank_k: Any, limits: QueryLimits = LIBRARY_LIMITS) -> str:
    """Validate a text search's arguments; returns the query. Raises InputError with the fix."""
    check_query(query, limits)
    check_counts(k, rerank_k, limits)
    return query


def _bad(field: str, message: str) -> InputError:
    """An InputError that names the argument it is about (``.field``), for APIs that report per field."""
    exc = InputError(message)
    exc.field = field  # type: ignore[attr-defined]
    return exc


def _is_int(value: Any) -> bool:
    import numbers

    return isinstance(value, numbers.Integral)


# ------------------------------------------------------------------------------------------------ filters
# The small filter form: {"folder": ..., "taken_after": "2024-01-01", "taken_before": ..., "camera": ..., "mime": ...}
# (store/filters.py turns it into each engine's filter). Anything else is a Qdrant Filter (must/should/must_not).
# folder/camera/mime: a string, or a non-empty list meaning "any of"; taken_after/taken_before: an ISO date or
# datetime (taken_after inclusive, taken_before exclusive).
FILTER_KEYS = ("folder", "taken_after", "taken_before", "camera", "mime")
FILTER_CLAUSES = ("must", "should", "must_not", "min_should")


def filter_from_json(raw: Any, where: str = "filter") -> Any:
    """A filter given as JSON data: the small form stays a dict (checked), anything with a Filter clause becomes
    a ``qdrant_client.models.Filter``. None/empty -> None."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, Mapping):
        raise InputError(f"{where} must be a JSON object: the small form (keys {', '.join(FILTER_KEYS)}) or a "
                         f"Qdrant Filter ({', '.join(FILTER_CLAUSES[:3])}); got {type(raw).__name__}")
    if any(key in raw for key in FILTER_CLAUSES):
        from pydantic import ValidationError
        from qdrant_client import models

        try:
            return models.Filter.model_validate(dict(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            at = ".".join(str(p) for p in first.get("loc", ()) if "[" not in str(p))
            raise InputError(f"{where} is not a valid Qdrant Filter at {at or 'top level'}: {first['msg']}") from None
    from edje_qdrant.store.filters import parse_dict

    parse_dict(raw)  # the small form's own checks, with their messages
    return dict(raw)


def filter_from_where(items: Iterable[str]) -> Any:
    """CLI ``--where`` values: ``KEY=VALUE`` pairs (a repeated key means "any of"), or one JSON filter."""
    items = list(items)
    if not items:
        return None
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            data = json.loads(items[0])
        except ValueError as exc:
            raise InputError(f"--where JSON does not parse: {exc}") from None
        return filter_from_json(data, "--where")
    form: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--where {item!r} must look like KEY=VALUE (e.g. folder=holidays) or be JSON")
        if key in form:
            previous = form[key] if isinstance(form[key], list) else [form[key]]
            form[key] = previous + [value]
        else:
            form[key] = value
    return filter_from_json(form, "--where")
