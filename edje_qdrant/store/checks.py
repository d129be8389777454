"""Checks shared by the Edge and qdrant-client stores: names, ids, vectors, spec comparison."""
from __future__ import annotations

import math
import re
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

from edje_qdrant.errors import InputError, ModelMismatchError, StoreError
from edje_qdrant.store.base import CollectionSpec

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_collection_name(name: str) -> str:
    """A collection name is also a folder name on Edge: letters, digits, ``_ . -``, at most 128 chars."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(
            f"collection name {name!r} is not allowed: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (e.g. --collection photos)"
        )
    return name


_LISTED = 20  # collection names a message lists at most


def missing_collection(name: str, where: str, existing: Sequence[str], option: str) -> StoreError:
    """The error for a collection that is not there: names the ones that are (a typo'd --collection is the common
    cause), and how to create this one. ``where`` labels the store, ``option`` is the flag that names it."""
    names = sorted(existing)
    if names:
        shown = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
        return StoreError(f"collection {name!r} does not exist in {where}; this store has: {shown}. Pass one of "
                          f"those to --collection (EDJE_COLLECTION), or create {name!r} with `edje-qdrant ingest "
                          f"DIR --collection {name}` (or check {option})")
    return StoreError(f"collection {name!r} does not exist in {where}, which holds no collection yet; run `edje-qdrant "
                      f"ingest DIR --collection {name}` first (or check {option})")


def check_vector(vector: Sequence[float], dim: int, what: str) -> list[float]:
    """A finite, non-zero vector of length ``dim`` as a list of floats."""
    try:
        vec = [float(x) for x in vector]
    except (TypeError, ValueError):
        raise InputError(f"{what}: vector must be a sequence of numbers") from None
    if len(vec) != dim:
        raise InputError(f"{what}: vector has {len(vec)} values but the collection's `clip` vector has {dim}")
    if not all(math.isfinite(x) for x in vec):
        raise InputError(f"{what}: vector contains NaN or infinity")
    if not any(vec):
        raise InputError(f"{what}: vector is all zeros (cosine distance needs a non-zero vector)")
    return vec


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"limit must be a positive integer, got {limit!r}")
    return limit


def check_spec(spec: CollectionSpec) -> None:
    if not isinstance(spec, CollectionSpec):
        raise InputError(f"spec must be a CollectionSpec, got {type(spec).__name__}")
    if spec.dim < 1:
        raise InputError(f"spec.dim must be positive, got {spec.dim}")


def verify_spec(collection: str, where: str, recorded: CollectionSpec, wanted: CollectionSpec) -> None:
    """Raise ModelMismatchError when ``wanted`` differs from ``recorded`` in fingerprint, codec or dim."""
    diffs = []
    if recorded.fingerprint != wanted.fingerprint:
        diffs.append(f"fingerprint: recorded {recorded.fingerprint!r}, asked {wanted.fingerprint!r}")
    if recorded.codec != wanted.codec:
        diffs.append(f"codec: recorded {recorded.codec!r}, asked {wanted.codec!r}")
    if recorded.dim != wanted.dim:
        diffs.append(f"vector dim: recorded {recorded.dim}, asked {wanted.dim}")
    if not diffs:
        return
    if recorded.model == wanted.model and recorded.fingerprint != wanted.fingerprint:
        raise ModelMismatchError(
            f"collection {collection!r} in {where} was built with another version of model {recorded.model!r} "
            f"({'; '.join(diffs)}); its stored vectors and tokens do not fit this version. Re-ingest your images "
            f"with the current model: `edje-qdrant ingest DIR` with a new --collection (or a fresh --store)."
        )
    raise ModelMismatchError(
        f"collection {collection!r} in {where} was built with model {recorded.model!r} "
        f"(fingerprint {recorded.fingerprint}, codec {recorded.codec}, dim {recorded.dim}), "
        f"but model {wanted.model!r} was asked for ({'; '.join(diffs)}). "
        f"Use the same --model {recorded.model} with this collection, or pick another --collection for the new model."
    )


def payload_selector(payload_keys: list[str] | None) -> bool | list[str]:
    """None -> all payload, [] -> none, else the listed keys (dotted paths allowed)."""
    if payload_keys is None:
        return True
    if isinstance(payload_keys, str):
        raise InputError(f"payload_keys must be a list of keys, got the string {payload_keys!r}")
    keys = list(payload_keys)
    return keys if keys else False


def clip_vector(record: Any) -> list[float] | None:
    """The `clip` vector of a retrieved record (named-vector dict or a bare list), as floats."""
    vec = getattr(record, "vector", None)
    if isinstance(vec, dict):
        vec = vec.get("clip")
    return [float(x) for x in vec] if vec is not None else None


def redact_url(url: str) -> str:
    """The URL without user:password and query string (where keys sometimes hide); safe to print."""
    try:
        parts = urlsplit(url)
        has_credentials = bool(parts.username or parts.password)
    except ValueError:  # unparsable: drop anything between "//" and "@", and any query string
        return re.sub(r"//[^/@]*@", "//", url).split("?", 1)[0]
    if has_credentials:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) if parts.query else url
