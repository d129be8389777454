import msgpack
import numpy as np
import pybase64
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edje_qdrant.codec import (
    MAX_BLOB_CHARS,
    codec_name,
    decode_batch,
    decode_tokens,
    encode_tokens,
)
from edje_qdrant.errors import CodecError, EdjeError


def _blob(record) -> str:
    return pybase64.b64encode(msgpack.packb(record, use_bin_type=True)).decode()


def _data_bytes(blob: str) -> int:
    """Raw token bytes in a blob (data, and scales for int8), read straight from its msgpack record."""
    record = msgpack.unpackb(pybase64.b64decode(blob))
    return len(record["data"]) + len(record.get("scales", b""))


def _valid_record(m=4, d=8):
    return {"v": 1, "dtype": "fp16", "shape": [m, d], "data": np.ones((m, d), "<f2").tobytes()}


def test_fp16_blob_is_exactly_49152_data_bytes_and_round_trips():
    x = np.random.default_rng(0).standard_normal((64, 384)).astype(np.float32)
    blob = encode_tokens(x)
    assert _data_bytes(blob) == 49_152
    np.testing.assert_array_equal(decode_tokens(blob), x.astype(np.float16).astype(np.float32))


def test_int8_halves_the_blob_and_stays_close():
    x = np.random.default_rng(1).standard_normal((64, 384)).astype(np.float32)
    blob = encode_tokens(x, "int8")
    assert _data_bytes(blob) <= 24_800
    y = decode_tokens(blob)
    step = np.abs(x).max(axis=1, keepdims=True) / 127
    assert (np.abs(y - x) <= step * 0.51 + 1e-3).all()


def test_codec_name_is_stable():
    assert codec_name("fp16", (64, 384)) == "edje-tokens/v1/fp16/64x384"
    with pytest.raises(CodecError):
        codec_name("fp64", (64, 384))


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r.update(v=2), "version"),
        (lambda r: r.update(dtype="fp64"), "dtype"),
        (lambda r: r.update(shape=[4]), "shape"),
        (lambda r: r.update(shape=[4, -8]), "shape"),
        (lambda r: r.update(shape=[4, 9]), "bytes"),
        (lambda r: r.update(data=r["data"][:-2]), "bytes"),
        (lambda r: r.update(data="text"), "bytes"),
        (lambda r: r.update(dtype="int8", data=b"\0" * 32), "scales"),
        (lambda r: r.pop("data"), "bytes"),
    ],
)
def test_malformed_records_raise_codec_error_naming_point(mutate, fragment):
    record = _valid_record()
    mutate(record)
    with pytest.raises(CodecError) as info:
        decode_tokens(_blob(record), point_id="p-42")
    assert "p-42" in str(info.value) and fragment in str(info.value)
    assert info.value.point_id == "p-42"


@pytest.mark.parametrize(
    "blob, fragment",
    [
        (None, "no 'edje_tokens'"),
        (123, "base64 string"),
        ("not base64!!", "base64"),
        (pybase64.b64encode(b"\xc1\xc1").decode(), "msgpack"),
        (pybase64.b64encode(msgpack.packb([1, 2])).decode(), "map"),
        ("A" * (MAX_BLOB_CHARS + 4), "cap"),
    ],
)
def test_garbage_blobs_raise_codec_error(blob, fragment):
    with pytest.raises(CodecError, match=fragment):
        decode_tokens(blob, point_id=7)


def test_expected_shape_mismatch_is_refused():
    blob = encode_tokens(np.zeros((8, 16), np.float32))
    with pytest.raises(CodecError, match="does not match"):
        decode_tokens(blob, expected_shape=(64, 384))


def test_decode_batch_flags_bad_rows_and_keeps_good_ones():
    good = encode_tokens(np.full((4, 8), 0.5, np.float32))
    arr, bad = decode_batch([good, "###", good, None], ["a", "b", "c", "d"], (4, 8))
    assert arr.shape == (4, 4, 8)
    assert sorted(bad) == [1, 3] and bad[1].point_id == "b"
    assert (arr[0] == 0.5).all() and (arr[2] == 0.5).all()


def test_encode_rejects_bad_arrays():
    with pytest.raises(CodecError):
        encode_tokens(np.zeros((2, 3, 4)))
    with pytest.raises(CodecError, match="NaN"):
        encode_tokens(np.full((2, 3), np.nan))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 80), st.integers(1, 96)),
        elements=st.floats(-60000, 60000, width=32),
    ),
    st.sampled_from(["fp16", "int8"]),
)
@example(np.array([[0.0001]], dtype=np.float32), "int8")  # a per-token scale below float16's normal range
def test_round_trip_property(x, dtype):
    y = decode_tokens(encode_tokens(x, dtype), expected_shape=x.shape)
    assert y.shape == x.shape and y.dtype == np.float32
    if dtype == "fp16":
        np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    else:
        # half a quantisation step, the float16 rounding of the per-token scale (relative 2^-11, and absolute
        # 2^-25 where a tiny scale is a float16 subnormal: x up to 127 times that), and float32 noise
        bound = np.abs(x).max(axis=1, keepdims=True) / 127 * 0.51 + np.abs(x) * 1e-3 + 127 * 2.0 ** -25 + 1e-6
        assert (np.abs(y - x) <= bound).all()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=512), st.text(max_size=512)))
def test_arbitrary_input_never_crashes_with_anything_but_codec_error(data):
    for blob in (data, pybase64.b64encode(data if isinstance(data, bytes) else data.encode()).decode()):
        try:
            decode_tokens(blob, point_id=1)
        except CodecError:
            pass
        except EdjeError as exc:  # pragma: no cover - would be a defect
            pytest.fail(f"unexpected error type {type(exc)}")
