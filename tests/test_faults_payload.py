"""Payload faults: a stored point's token blob damaged in every way; the query still answers, the damaged
candidate keeps its first-stage score and slot and is flagged. Plus property tests on the codec's decoder
fed structured garbage (valid base64 + msgpack maps with wrong fields), beyond the raw-bytes fuzz in test_codec.
"""
from __future__ import annotations

import logging

import msgpack
import numpy as np
import pybase64
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edje_qdrant.codec import MAX_BLOB_CHARS, decode_batch, decode_tokens, encode_tokens

from edje_qdrant.schema import TOKENS_KEY
from edje_qdrant.errors import CodecError
from edje_qdrant.ingestion import ingest
from edje_qdrant.retriever import Retriever
from edje_qdrant.store import open_store
from edje_qdrant.store.base import PointRecord

QUERY = "a red square"


def _blob(record: dict) -> str:
    return pybase64.b64encode(msgpack.packb(record, use_bin_type=True)).decode("ascii")


def _record(m: int = 64, d: int = 384, **changes) -> dict:
    rec = {"v": 1, "dtype": "fp16", "shape": [m, d], "data": np.full((m, d), 0.1, "<f2").tobytes()}
    rec.update(changes)
    return rec


def _truncated_data() -> str:
    rec = _record()
    rec["data"] = rec["data"][: len(rec["data"]) // 2]
    return _blob(rec)


def _nan_tokens() -> str:
    rec = _record()
    rec["data"] = np.full((64, 384), np.nan, "<f2").tobytes()
    return _blob(rec)


# kind -> (payload change: a value for edje_tokens, or None to remove the key; fragment of the flag's reason)
FAULTS = {
    "truncated-string": (lambda good: good[: len(good) // 2 + 1], "base64"),
    "truncated-data": (lambda good: _truncated_data(), "bytes"),
    "wrong-version": (lambda good: _blob(_record(v=2)), "version"),
    "wrong-shape": (lambda good: _blob(_record(32, 384)), "does not match"),
    "wrong-dtype": (lambda good: _blob(_record(dtype="fp32")), "dtype"),
    "oversized": (lambda good: "A" * (MAX_BLOB_CHARS + 4), "cap"),
    "not-base64": (lambda good: "this is not a token blob!", "base64"),
    "missing": (None, "no 'edje_tokens'"),
    "empty-string": (lambda good: "", "msgpack"),
    "wrong-type": (lambda good: {"data": good[:10]}, "base64 string"),
    "not-a-map": (lambda good: _blob([1, 2, 3]), "map"),
    "nan-values": (lambda good: _nan_tokens(), "non-finite"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_folder, tiny_model):
    """An Edge store with the 12 demo images; the victim is the 4th best first-stage hit for QUERY."""
    store = open_store(path=str(tmp_path_factory.mktemp("payload") / "store"))
    assert ingest(demo_folder, store, tiny_model, "images").ingested == 12
    retriever = Retriever(store, "images", tiny_model)
    baseline = retriever.search(QUERY, k=12, rerank_k=12)
    victim = sorted(baseline, key=lambda r: -r.first_stage_score)[3]
    # The store does not return vectors: recompute them from the files, as ingest did.
    from PIL import Image

    vectors = {}
    for r in baseline:
        with Image.open(r.path) as im:
            pixels = tiny_model.vision.preprocess(im.convert("RGB"))[None]
        vectors[r.id] = tiny_model.embed_images(pixels)[0][0].tolist()
    points = {h.id: PointRecord(id=h.id, vector=vectors[h.id], payload=dict(h.payload))
              for h in store.retrieve("images", list(vectors), None)}
    yield store, retriever, baseline, points[victim.id], points
    store.close()


@pytest.mark.parametrize("kind", list(FAULTS))
def test_damaged_blob_keeps_first_stage_score_and_is_flagged(setup, kind, caplog):
    store, retriever, baseline, original, _ = setup
    change, fragment = FAULTS[kind]
    payload = dict(original.payload)
    if change is None:
        del payload[TOKENS_KEY]
    else:
        payload[TOKENS_KEY] = change(original.payload[TOKENS_KEY])
    store.upsert("images", [PointRecord(id=original.id, vector=original.vector, payload=payload)])
    try:
        with caplog.at_level(logging.WARNING, logger="edje_qdrant"):
            results = retriever.search(QUERY, k=12, rerank_k=12)
    finally:
        store.upsert("images", [original])  # the next case starts from the intact point
    assert len(results) == 12 and {r.id for r in results} == {r.id for r in baseline}
    bad = next(r for r in results if r.id == original.id)
    assert bad.rerank_score is None and bad.score == bad.first_stage_score
    assert len(bad.flags) == 1 and bad.flags[0].startswith("rerank_failed: ") and fragment in bad.flags[0], bad.flags
    first_stage_slot = sorted(results, key=lambda r: -r.first_stage_score).index(bad)
    assert results.index(bad) == first_stage_slot
    others = [r for r in results if r.id != original.id]
    assert all(r.rerank_score is not None and not r.flags for r in others)
    assert [r.score for r in others] == sorted((r.score for r in others), reverse=True)
    by_id = {r.id: r.rerank_score for r in baseline}
    assert all(r.rerank_score == pytest.approx(by_id[r.id], abs=1e-5) for r in others)  # unaffected by the fault
    assert original.id in caplog.text


def test_every_candidate_damaged_still_answers_in_first_stage_order(setup):
    store, retriever, baseline, _, points = setup
    store.upsert("images", [PointRecord(p.id, p.vector, dict(p.payload, **{TOKENS_KEY: "#"})) for p in points.values()])
    try:
        results = retriever.search(QUERY, k=5, rerank_k=12)
    finally:
        store.upsert("images", list(points.values()))
    assert len(results) == 5 and all(r.rerank_score is None and r.flags for r in results)
    first_stage = sorted((r.first_stage_score for r in baseline), reverse=True)[:5]
    assert [r.score for r in results] == pytest.approx(first_stage, abs=1e-5)


# --------------------------------------------------------------------------- codec properties

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=8,
)
_SHAPES = st.lists(st.integers(-3, 5000) | st.booleans() | st.floats(0, 10) | st.text(max_size=3), max_size=3)


@st.composite
def near_valid_records(draw):
    """Maps that look like token records, with any field wrong, missing or of the wrong type."""
    m, d = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(["fp16", "int8", "fp32", "", None, 1]))
    size = {"fp16": 2, "int8": 1}.get(dtype, 2)
    rec = {
        "v": draw(st.sampled_from([1, 1, 1, 0, 2, "1", None, True])),
        "dtype": dtype,
        "shape": draw(st.just([m, d]) | _SHAPES),
        "data": draw(st.just(bytes(m * d * size)) | st.binary(max_size=m * d * size + 4) | _VALUES),
        "scales": draw(st.just(bytes(2 * m)) | st.binary(max_size=2 * m + 2) | _VALUES),
    }
    for key in draw(st.sets(st.sampled_from(sorted(rec)), max_size=2)):
        del rec[key]
    rec.update(draw(st.dictionaries(st.text(max_size=4), _VALUES, max_size=2)))
    return rec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid_records(), st.sampled_from([None, (8, 8), (1, 1)]))
def test_structured_garbage_gives_codec_error_or_the_declared_array(record, expected_shape):
    blob = _blob(record)
    try:
        out = decode_tokens(blob, point_id="p1", expected_shape=expected_shape)
    except CodecError as exc:
        assert exc.point_id == "p1" and str(exc).startswith("point p1: ")
        return
    # Accepted only when the record is a complete, consistent one.
    assert record["v"] == 1 and record["dtype"] in ("fp16", "int8")
    assert out.dtype == np.float32 and list(out.shape) == record["shape"]
    assert expected_shape is None or out.shape == expected_shape


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=40), st.binary(max_size=40),
                          near_valid_records().map(_blob)), max_size=6))
def test_decode_batch_never_raises_and_zeroes_only_the_bad_rows(blobs):
    good = encode_tokens(np.full((2, 3), 0.5, np.float32))
    rows = [good, *blobs, good]
    arr, bad = decode_batch(rows, list(range(len(rows))), (2, 3))
    assert arr.shape == (len(rows), 2, 3) and 0 not in bad and len(rows) - 1 not in bad
    for i in range(len(rows)):
        if i in bad:
            assert isinstance(bad[i], CodecError) and bad[i].point_id == i and not arr[i].any()
    assert (arr[0] == 0.5).all() and (arr[-1] == 0.5).all()
