"""The HTTP API's request and response bodies (pydantic), generated from ``search_args`` (the limits) and
``store.filters`` (the filter forms).

The OpenAPI schema states every limit a request is checked against (query length, k, rerank_k, both filter
forms), so a request the schema accepts is one the service accepts. The one rule JSON Schema cannot say,
``k <= rerank_k`` when re-ranking, is in the field's description.
"""
from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictStr, ValidationInfo,
                      WithJsonSchema, create_model)
from pydantic_core import PydanticCustomError

from edje_qdrant.errors import InputError
from edje_qdrant.search_args import NOT_BLANK_PATTERN, QueryLimits
from edje_qdrant.store.filters import parse_when

MAX_FILTER_ITEMS = 16  # values in a filter list / conditions in a filter clause (keeps bodies small)
MAX_FILTER_TEXT = 256  # characters of one filter value


def whole_number(low: int, high: int, description: str) -> Any:
    """An integer field between ``low`` and ``high`` as JSON Schema counts integers: 3 and 3.0 are integers,
    "3", true and 3.5 are not."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise PydanticCustomError("int_type", "Input should be a valid integer")
        if value < low:
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to {ge}",
                                      {"ge": low})
        if value > high:
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": high})
        return int(value)

    schema: dict[str, Any] = {"type": "integer", "minimum": low, "maximum": high}
    return Annotated[int, PlainValidator(check), WithJsonSchema({**schema, "description": description}
                                                                if description else schema)]


def bounded_number(low: float, high: float) -> Any:
    """A JSON number (integer or not, never a string or boolean) between ``low`` and ``high``."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PydanticCustomError("float_type", "Input should be a valid number")
        if not low <= value <= high:
            raise PydanticCustomError("number_range", "Input should be between {low} and {high}",
                                      {"low": low, "high": high})
        return float(value)

    return Annotated[float, PlainValidator(check), WithJsonSchema({"type": "number", "minimum": low,
                                                                    "maximum": high})]


Text = Annotated[StrictStr, Field(max_length=MAX_FILTER_TEXT)]
# Integers a JSON reader that parses numbers as doubles still reads exactly. Past 2**53 a value and a bound can
# round to the same double (9223372036854775999 reads as 2**63), so a schema bounded at int64 accepts values the
# service rejects; within +-(2**53 - 1) every reader, the schema and the service agree.
MAX_SAFE_INT = 2**53 - 1
SafeInt = whole_number(-MAX_SAFE_INT, MAX_SAFE_INT, "an integer within +-(2**53 - 1), read exactly by every JSON "
                                                    "reader (Qdrant stores int64; larger values are not supported)")
Number = bounded_number(-1e15, 1e15)
PayloadKey = Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,3}$",
                                        description="a payload key such as metadata.folder")]
TextOrList = Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_FILTER_ITEMS)]]


def _when(value: Any, info: ValidationInfo) -> str:
    """ISO date or datetime text, checked by the same parser the stores use (a JSON number is not a date); kept
    as text, which ``store.filters`` reads."""
    if not isinstance(value, str):
        raise PydanticCustomError("date_type", "Input should be an ISO date or datetime string")
    try:
        parse_when(info.field_name or "date", value)
    except InputError as exc:
        raise PydanticCustomError("date_parsing", str(exc)) from None
    return value


When = Annotated[str, PlainValidator(_when), WithJsonSchema(
    {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]})]

_STRICT = ConfigDict(extra="forbid")


class SmallFilter(BaseModel):
    """The small filter form over the metadata ingest writes (``store.filters``)."""

    model_config = _STRICT
    folder: Optional[TextOrList] = Field(None, description="metadata.folder: a value, or a list meaning any of")
    camera: Optional[TextOrList] = Field(None, description="metadata.camera / camera_model / camera_make")
    mime: Optional[TextOrList] = Field(None, description="metadata.mime, e.g. image/jpeg")
    taken_after: Optional[When] = Field(None, description="metadata.taken_at >= this ISO date or datetime")
    taken_before: Optional[When] = Field(None, description="metadata.taken_at < this ISO date or datetime")


class MatchValue(BaseModel):
    model_config = _STRICT
    value: Union[StrictBool, SafeInt, Text]


class MatchAny(BaseModel):
    model_config = _STRICT
    any: Annotated[list[Text], Field(min_length=1, max_length=MAX_FILTER_ITEMS)]


class Range(BaseModel):
    model_config = _STRICT
    gt: Optional[Number] = None
    gte: Optional[Number] = None
    lt: Optional[Number] = None
    lte: Optional[Number] = None


class MatchCondition(BaseModel):
    model_config = _STRICT
    key: PayloadKey
    match: Union[MatchValue, MatchAny]


class RangeCondition(BaseModel):
    model_config = _STRICT
    key: PayloadKey
    range: Range


Conditions = Annotated[list[Union[MatchCondition, RangeCondition]], Field(max_length=MAX_FILTER_ITEMS)]


class QdrantFilter(BaseModel):
    """A Qdrant Filter (JSON as in Qdrant's REST API), the field-condition part: match a value / any of values,
    or a numeric range, combined with must / should / must_not."""

    model_config = _STRICT
    must: Optional[Conditions] = None
    should: Optional[Conditions] = None
    must_not: Optional[Conditions] = None


def search_request_model(limits: QueryLimits) -> type[BaseModel]:
    """The body of POST /search under ``limits`` (defaults k=10, rerank_k=100, lowered to the limits)."""
    rerank_default = min(100, limits.max_rerank_k)
    k_default = min(10, limits.max_k, rerank_default or limits.max_k)  # a default pair the limits accept
    fields: dict[str, Any] = {
        "query": (StrictStr, Field(min_length=1, max_length=limits.max_query_chars, pattern=NOT_BLANK_PATTERN,
                                   description="Text to search for (not blank).")),
        "k": (whole_number(1, limits.max_k, "Results to return; at most rerank_k when rerank_k > 0."), k_default),
        "rerank_k": (whole_number(0, limits.max_rerank_k, "First-stage candidates to re-rank (0 = no re-ranking; "
                                                            "else at least k)."), rerank_default),
        "filter": (Optional[Union[SmallFilter, QdrantFilter]],
                   Field(None, description="The small form (folder, taken_after, taken_before, camera, mime) or a "
                                           "Qdrant Filter of field conditions (must/should/must_not).")),
    }
    return create_model("SearchRequest", __config__=_STRICT, __doc__="Body of POST /search.", **fields)


def filter_data(value: BaseModel | None) -> dict[str, Any] | None:
    """A validated filter as the JSON data ``store.filters.filter_from_json`` reads (None when empty)."""
    if value is None:
        return None
    data = value.model_dump(mode="json", exclude_none=True)
    return data or None


class ResultOut(BaseModel):
    id: str
    path: Optional[str]
    score: float = Field(description="What the results are sorted by: rerank_score + the model's fusion_weight x "
                                     "first_stage_score when re-ranked, first_stage_score when not.")
    first_stage_score: float = Field(description="Cosine similarity of the ANN (first-stage) search.")
    rerank_score: Optional[float] = Field(description="The joint encoder's logit; null when not re-ranked.")
    page_content: str
    metadata: dict[str, Any]
    flags: list[str]
    first_stage_rank: Optional[int] = Field(None, description="1-based place in the first-stage (ANN) list; "
                                                                "with re-ranking, how far the joint encoder moved it")
    thumbnail_url: str = Field(description="GET: a JPEG thumbnail (query parameter size=32..1024); signed when the "
                                           "service has an API key, so an <img> tag can load it")
    image_url: str = Field(description="GET: the original file (signed like thumbnail_url)")


class SearchResponse(BaseModel):
    query: str
    k: int
    rerank_k: int
    collection: str
    took_ms: float
    results: list[ResultOut]


class ImageSearchResponse(BaseModel):
    """Body of an image search ("more like this"): first stage only, so rerank_score is null."""

    k: int
    collection: str
    took_ms: float
    similar_to: Optional[str] = Field(description="the point id searched from; null for an uploaded photo")
    results: list[ResultOut]


class ErrorOut(BaseModel):
    detail: Any
