"""What one search may ask for: the query text and the counts ``k`` / ``rerank_k``, within limits.

The library, the CLI and the HTTP service check searches with these functions (the service's OpenAPI constraints
are generated from ``QueryLimits``), so every surface refuses the same arguments with the same messages. A leaf:
it imports only the error types.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from edje_qdrant.errors import InputError


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
    return isinstance(value, numbers.Integral)
