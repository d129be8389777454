"""Search filters: a qdrant-client ``models.Filter`` (the user-facing type) or a small dict form.

The dict form keys map to payload fields written by ingest:
``folder`` -> ``metadata.folder``, ``mime`` -> ``metadata.mime``, ``camera`` -> any of ``metadata.camera``,
``metadata.camera_model``, ``metadata.camera_make`` (a string, or a list meaning "any of");
``taken_after`` / ``taken_before`` -> a datetime range on
``metadata.taken_at`` (ISO date or datetime; ``taken_after`` is inclusive, ``taken_before`` exclusive;
a datetime without a time zone is read as UTC).  ``to_edge_filter`` converts a ``models.Filter`` to
Qdrant Edge's own filter classes.
"""
from __future__ import annotations

import datetime as dt
import sys
import uuid
from typing import Any, Mapping

from edje_qdrant.errors import InputError
from edje_qdrant.rules import FILTER_KEYS

_MATCH_FIELDS = {
    "folder": ("metadata.folder",),
    "camera": ("metadata.camera", "metadata.camera_model", "metadata.camera_make"),
    "mime": ("metadata.mime",),
}
TAKEN_AT = "metadata.taken_at"
_CLIENT_MODELS = "qdrant_client.http.models.models"  # checked via sys.modules: no import cost on the Edge path


def _is_client_filter(obj: Any) -> bool:
    mod = sys.modules.get(_CLIENT_MODELS)
    return mod is not None and isinstance(obj, mod.Filter)


def _bad_type(filter: Any) -> InputError:
    return InputError(
        f"filter must be a qdrant_client.models.Filter or a dict with keys {', '.join(FILTER_KEYS)}; "
        f"got {type(filter).__name__}"
    )


def build_filter(filter: Any) -> Any:
    """Normalise ``None`` / ``models.Filter`` / dict form into a qdrant-client ``models.Filter`` (or None)."""
    if filter is None:
        return None
    if _is_client_filter(filter):
        return filter
    if not isinstance(filter, Mapping):
        raise _bad_type(filter)
    from qdrant_client import models

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
    after, before = d.get("taken_after"), d.get("taken_before")
    if after is not None or before is not None:
        gte = parse_when("taken_after", after) if after is not None else None
        lt = parse_when("taken_before", before) if before is not None else None
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


# --------------------------------------------------------------------------- Qdrant Edge conversion


def to_edge_filter(filter: Any) -> Any:
    """Convert a ``models.Filter`` or the dict form into a ``qdrant_edge.Filter``; unsupported parts -> InputError."""
    if filter is None:
        return None
    import qdrant_edge as qe

    if _is_client_filter(filter):
        return _edge_filter(qe, filter)
    if not isinstance(filter, Mapping):
        raise _bad_type(filter)
    must: list[Any] = []
    for kind, fields, a, b in parse_dict(filter):
        if kind == "match":
            match = qe.MatchValue(a) if isinstance(a, str) else qe.MatchAny(a)
            conds = [qe.FieldCondition(key=f, match=match) for f in fields]
            must.append(conds[0] if len(conds) == 1 else qe.Filter(should=conds))
        else:
            must.append(qe.FieldCondition(key=fields[0], range=qe.RangeDateTime(gte=_iso(a), lt=_iso(b))))
    return qe.Filter(must=must) if must else None


def _as_list(v: Any) -> list[Any] | None:
    if v is None:
        return None
    return list(v) if isinstance(v, list) else [v]


def _edge_filter(qe: Any, f: Any) -> Any:
    def conds(v: Any) -> list[Any] | None:
        items = _as_list(v)
        return None if items is None else [_edge_condition(qe, c) for c in items]

    min_should = None
    if f.min_should is not None:
        min_should = qe.MinShould(
            conditions=[_edge_condition(qe, c) for c in f.min_should.conditions],
            min_count=f.min_should.min_count,
        )
    return qe.Filter(must=conds(f.must), should=conds(f.should), must_not=conds(f.must_not), min_should=min_should)


def _edge_condition(qe: Any, c: Any) -> Any:
    from qdrant_client import models  # already imported: the caller built a models.Filter

    if isinstance(c, models.Filter):
        return _edge_filter(qe, c)
    if isinstance(c, models.FieldCondition):
        return _edge_field(qe, c)
    if isinstance(c, models.IsEmptyCondition):
        return qe.IsEmptyCondition(key=c.is_empty.key)
    if isinstance(c, models.IsNullCondition):
        return qe.IsNullCondition(key=c.is_null.key)
    if isinstance(c, models.HasIdCondition):
        return qe.HasIdCondition(point_ids={_edge_id(i) for i in c.has_id})
    if isinstance(c, models.HasVectorCondition):
        return qe.HasVectorCondition(vector=c.has_vector)
    if isinstance(c, models.NestedCondition):
        return qe.NestedCondition(key=c.nested.key, filter=_edge_filter(qe, c.nested.filter))
    if isinstance(c, models.SliceCondition):
        return qe.SliceCondition(total=c.slice.total, index=c.slice.index)
    raise InputError(f"filter condition {type(c).__name__} is not supported by the embedded Qdrant Edge store")


def _edge_id(i: Any) -> Any:
    if isinstance(i, int):
        return i
    try:
        return uuid.UUID(str(i))
    except ValueError:
        raise InputError(f"has_id filter: {i!r} is not a UUID or unsigned integer point id") from None


def _edge_field(qe: Any, c: Any) -> Any:
    kw: dict[str, Any] = {}
    if c.match is not None:
        kw["match"] = _edge_match(qe, c.key, c.match)
    if c.range is not None:
        kw["range"] = _edge_range(qe, c.range)
    if c.geo_radius is not None:
        kw["geo_radius"] = qe.GeoRadius(center=_geo(qe, c.geo_radius.center), radius=c.geo_radius.radius)
    if c.geo_bounding_box is not None:
        box = c.geo_bounding_box
        kw["geo_bounding_box"] = qe.GeoBoundingBox(
            top_left=_geo(qe, box.top_left), bottom_right=_geo(qe, box.bottom_right)
        )
    if c.geo_polygon is not None:
        poly = c.geo_polygon
        interiors = [[_geo(qe, p) for p in ring.points] for ring in poly.interiors] if poly.interiors else None
        kw["geo_polygon"] = qe.GeoPolygon(exterior=[_geo(qe, p) for p in poly.exterior.points], interiors=interiors)
    if c.values_count is not None:
        vc = c.values_count
        kw["values_count"] = qe.ValuesCount(lt=vc.lt, gt=vc.gt, lte=vc.lte, gte=vc.gte)
    if c.is_empty is not None:
        kw["is_empty"] = c.is_empty
    if c.is_null is not None:
        kw["is_null"] = c.is_null
    if not kw:
        raise InputError(f"filter field condition on {c.key!r} has no match, range, geo or count part")
    return qe.FieldCondition(key=c.key, **kw)


def _geo(qe: Any, p: Any) -> Any:
    return qe.GeoPoint(lon=p.lon, lat=p.lat)


def _edge_match(qe: Any, key: str, m: Any) -> Any:
    from qdrant_client import models

    if isinstance(m, models.MatchValue):
        return qe.MatchValue(m.value)
    if isinstance(m, models.MatchAny):
        return qe.MatchAny(list(m.any))
    if isinstance(m, models.MatchExcept):
        return qe.MatchExcept(list(m.except_))
    if isinstance(m, models.MatchText):
        return qe.MatchText(m.text)
    if isinstance(m, models.MatchTextAny):
        return qe.MatchTextAny(m.text_any)
    if isinstance(m, models.MatchPhrase):
        return qe.MatchPhrase(m.phrase)
    if isinstance(m, models.MatchPrefix):
        return qe.MatchPrefix(m.prefix)
    if isinstance(m, models.MatchSubstring):
        return qe.MatchSubstring(m.substring)
    raise InputError(f"filter on {key!r}: match type {type(m).__name__} is not supported by Qdrant Edge")


def _edge_range(qe: Any, r: Any) -> Any:
    from qdrant_client import models

    if isinstance(r, models.DatetimeRange):
        return qe.RangeDateTime(gte=_iso(r.gte), gt=_iso(r.gt), lte=_iso(r.lte), lt=_iso(r.lt))
    return qe.RangeFloat(gte=r.gte, gt=r.gt, lte=r.lte, lt=r.lt)


def _iso(v: dt.datetime | dt.date | None) -> str | None:
    return None if v is None else v.isoformat()
