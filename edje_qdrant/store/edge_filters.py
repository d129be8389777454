"""Search filters on the embedded store: a qdrant-client ``models.Filter`` or the small dict form (``filters``)
turned into Qdrant Edge's own filter classes; a part Edge does not support is an InputError naming it."""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

import qdrant_edge as qe

from edje_qdrant.errors import InputError
from edje_qdrant.store.filters import is_client_filter, parse_dict, wrong_filter_type

def to_edge_filter(filter: Any) -> Any:
    """Convert a ``models.Filter`` or the dict form into a ``qdrant_edge.Filter``; unsupported parts -> InputError."""
    if filter is None:
        return None
    if is_client_filter(filter):
        return _edge_filter(qe, filter)
    if not isinstance(filter, Mapping):
        raise wrong_filter_type(filter)
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
    from qdrant_client import models  # cost: qdrant-client takes seconds (already loaded: the caller built a Filter)

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
    from qdrant_client import models  # cost: qdrant-client takes seconds (already loaded, as above)

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
    from qdrant_client import models  # cost: qdrant-client takes seconds (already loaded, as above)

    if isinstance(r, models.DatetimeRange):
        return qe.RangeDateTime(gte=_iso(r.gte), gt=_iso(r.gt), lte=_iso(r.lte), lt=_iso(r.lt))
    return qe.RangeFloat(gte=r.gte, gt=r.gt, lte=r.lte, lt=r.lt)


def _iso(v: dt.datetime | dt.date | None) -> str | None:
    return None if v is None else v.isoformat()
