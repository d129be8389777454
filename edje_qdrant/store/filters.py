"""Search filters, both forms: a qdrant-client ``models.Filter`` (the user-facing type) or a small dict form.

The dict form keys map to payload fields written by ingest:
``folder`` -> ``metadata.folder``, ``mime`` -> ``metadata.mime``, ``camera`` -> any of ``metadata.camera``,
``metadata.camera_model``, ``metadata.camera_make`` (a string, or a non-empty list meaning "any of");
``taken_after`` / ``taken_before`` -> a datetime range on ``metadata.taken_at`` (ISO date or datetime;
``taken_after`` is inclusive, ``taken_before`` exclusive; a datetime without a time zone is read as UTC).
Anything else is a Qdrant Filter (must/should/must_not/min_should).

``filter_from_json`` and ``filter_from_where`` read a filter as JSON data (HTTP) or ``--where`` values (CLI);
``build_filter`` makes the qdrant-client filter a server store runs, ``edge_filters`` the embedded store's.
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any, Iterable, Mapping

from edje_qdrant.errors import InputError
from edje_qdrant.schema import (CAMERA_KEY, CAMERA_MAKE_KEY, CAMERA_MODEL_KEY, FOLDER_KEY, MIME_KEY, TAKEN_AT_KEY,
                                metadata_field)

TAKEN_AFTER, TAKEN_BEFORE = "taken_after", "taken_before"
FILTER_KEYS = (FOLDER_KEY, TAKEN_AFTER, TAKEN_BEFORE, CAMERA_KEY, MIME_KEY)  # the small form's keys
FILTER_CLAUSES = ("must", "should", "must_not", "min_should")
_MATCH_FIELDS = {  # a small-form key -> the payload fields it matches
    FOLDER_KEY: (metadata_field(FOLDER_KEY),),
    CAMERA_KEY: tuple(metadata_field(k) for k in (CAMERA_KEY, CAMERA_MODEL_KEY, CAMERA_MAKE_KEY)),
    MIME_KEY: (metadata_field(MIME_KEY),),
}
FILTER_HELP = {  # what each small-form key matches, as the HTTP API documents it
    FOLDER_KEY: "metadata.folder (repeat for any of)",
    CAMERA_KEY: "metadata.camera / camera_model / camera_make (repeat for any of)",
    MIME_KEY: "metadata.mime, e.g. image/jpeg (repeat for any of)",
    TAKEN_AFTER: "metadata.taken_at >= this ISO date or datetime",
    TAKEN_BEFORE: "metadata.taken_at < this ISO date or datetime",
}
TAKEN_AT = metadata_field(TAKEN_AT_KEY)
_CLIENT_MODELS = "qdrant_client.http.models.models"  # checked via sys.modules: no import cost on the Edge path


def is_client_filter(obj: Any) -> bool:
    """Whether ``obj`` is a qdrant-client ``models.Filter`` (without importing qdrant-client)."""
    mod = sys.modules.get(_CLIENT_MODELS)
    return mod is not None and isinstance(obj, mod.Filter)


def wrong_filter_type(filter: Any) -> InputError:
    """The error for a filter that is neither form."""
    return InputError(
        f"filter must be a qdrant_client.models.Filter or a dict with keys {', '.join(FILTER_KEYS)}; "
        f"got {type(filter).__name__}"
    )


# --------------------------------------------------------------------------- reading a filter
def filter_from_json(raw: Any, where: str = "filter") -> Any:
    """A filter given as JSON data: the small form stays a dict (checked), anything with a Filter clause becomes
    a ``qdrant_client.models.Filter``. None/empty -> None."""
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, Mapping):
        raise InputError(f"{where} must be a JSON object: the small form (keys {', '.join(FILTER_KEYS)}) or a "
                         f"Qdrant Filter ({', '.join(FILTER_CLAUSES[:3])}); got {type(raw).__name__}")
    if any(key in raw for key in FILTER_CLAUSES):
        return _client_filter_from_json(raw, where)
    parse_dict(raw)  # the small form's own checks, with their messages
    return dict(raw)


def _client_filter_from_json(raw: Mapping[str, Any], where: str) -> Any:
    from pydantic import ValidationError  # cost: pydantic and qdrant-client take seconds to import
    from qdrant_client import models  # cost: as above

    try:
        return models.Filter.model_validate(dict(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        at = ".".join(str(p) for p in first.get("loc", ()) if "[" not in str(p))
        raise InputError(f"{where} is not a valid Qdrant Filter at {at or 'top level'}: {first['msg']}") from None


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
        key, value = split_key_value(item, f"--where {item!r} must look like KEY=VALUE (e.g. folder=holidays) or be "
                                           "JSON")
        if key in form:
            previous = form[key] if isinstance(form[key], list) else [form[key]]
            form[key] = previous + [value]
        else:
            form[key] = value
    return filter_from_json(form, "--where")


# --------------------------------------------------------------------------- the dict form
def build_filter(filter: Any) -> Any:
    """Normalise ``None`` / ``models.Filter`` / dict form into a qdrant-client ``models.Filter`` (or None)."""
    if filter is None:
        return None
    if is_client_filter(filter):
        return filter
    if not isinstance(filter, Mapping):
        raise wrong_filter_type(filter)
    from qdrant_client import models  # cost: qdrant-client takes seconds to import

    must: list[Any] = []
    for kind, fields, a, b in parse_dict(filter):
        if kind == "match":
            match = models.MatchValue(value=a) if isinstance(a, str) else models.MatchAny(any=a)
            conds = [models.FieldCondition(key=f, match=match) for f in fields]
            must.append(conds[0] if len(conds) == 1 else models.Filter(should=conds))
        else:
            must.append(models.FieldCondition(key=fields[0], range=models.DatetimeRange(gte=a, lt=b)))
    return models.Filter(must=must) if must else None


def parse_dict(d: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...], Any, Any]]:
    """Validate the dict form into engine-neutral parts: ("match", fields, str|list, None) or
    ("datetime", (field,), gte|None, lt|None)."""
    unknown = sorted(str(k) for k in d if k not in FILTER_KEYS)
    if unknown:
        raise InputError(
            f"unknown filter key(s) {', '.join(unknown)}; allowed keys: {', '.join(FILTER_KEYS)} "
            "(or pass a qdrant_client.models.Filter for anything else)"
        )
    parts: list[tuple[str, tuple[str, ...], Any, Any]] = []
    for key, fields in _MATCH_FIELDS.items():
        value = d.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            parts.append(("match", fields, value, None))
        elif isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) for v in value):
            parts.append(("match", fields, sorted(value), None))
        else:
            raise InputError(f"filter {key!r} must be a string or a non-empty list of strings, got {value!r}")
    after, before = d.get(TAKEN_AFTER), d.get(TAKEN_BEFORE)
    if after is not None or before is not None:
        gte = parse_when(TAKEN_AFTER, after) if after is not None else None
        lt = parse_when(TAKEN_BEFORE, before) if before is not None else None
        parts.append(("datetime", (TAKEN_AT,), gte, lt))
    return parts


def parse_when(key: str, value: Any) -> dt.datetime | dt.date:
    """A ``taken_after`` / ``taken_before`` value: a date or datetime, or its ISO text (a number is not a date)."""
    if isinstance(value, (dt.datetime, dt.date)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                return dt.date.fromisoformat(text)
            return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
    raise InputError(f"filter {key!r} must be an ISO date or datetime such as '2024-01-31', got {value!r}")


def split_key_value(item: str, problem: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key without surrounding blanks, value); ``InputError(problem)`` without ``=`` or key."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(problem)
    return key, value
