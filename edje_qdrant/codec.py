"""Token blob codec: compressed image tokens <-> one base64 payload string.

Blob = base64(msgpack map {"v": version, "dtype": "fp16"|"int8", "shape": [m, d], "data": raw bytes,
"scales": float16 bytes (int8 only, one per token)}). Decoding validates every field before touching the
bytes and raises ``CodecError`` naming the point; nothing is pickled. Values are not checked for NaN here
(that costs more than the decode): a non-finite score is caught by the Retriever.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import msgpack
import numpy as np
import pybase64

from .errors import CodecError
from .schema import TOKENS_KEY

CODEC_VERSION = 1
DTYPES = ("fp16", "int8")
MAX_TOKENS = 4096
MAX_DIM = 8192
MAX_BLOB_CHARS = 4 * (2 * 1024 * 1024) // 3 + 4  # base64 of at most 2 MiB of msgpack
_ITEM_SIZE = {"fp16": 2, "int8": 1}
_NP_DTYPE = {"fp16": np.dtype("<f2"), "int8": np.dtype("i1")}


def codec_name(dtype: str, shape: tuple[int, int]) -> str:
    """Stable codec identifier recorded per collection, e.g. ``edje-tokens/v1/fp16/64x384``."""
    _check_dtype_arg(dtype)
    return f"edje-tokens/v{CODEC_VERSION}/{dtype}/{shape[0]}x{shape[1]}"


def _check_dtype_arg(dtype: str) -> None:
    if dtype not in DTYPES:
        raise CodecError(f"unknown token dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def encode_tokens(tokens: np.ndarray, dtype: str = "fp16") -> str:
    """[m, d] float array -> blob string. int8 uses a symmetric per-token scale (max|x| / 127)."""
    _check_dtype_arg(dtype)
    arr = np.asarray(tokens, dtype=np.float32)
    if arr.ndim != 2 or not (0 < arr.shape[0] <= MAX_TOKENS and 0 < arr.shape[1] <= MAX_DIM):
        raise CodecError(f"tokens must be a 2-D [m, d] array within {MAX_TOKENS}x{MAX_DIM}, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise CodecError("tokens contain NaN or infinity; the model output is broken")
    if arr.size and np.abs(arr).max() > 65504:
        raise CodecError("token values exceed the float16 range (|x| > 65504); the model output is broken")
    record: dict[str, Any] = {"v": CODEC_VERSION, "dtype": dtype, "shape": list(arr.shape)}
    if dtype == "fp16":
        record["data"] = arr.astype("<f2").tobytes()
    else:
        scales = (np.abs(arr).max(axis=1) / 127.0).astype("<f2")
        scales[scales == 0] = 1.0  # all-zero (or below float16 resolution) rows quantize to zero
        q = np.clip(np.rint(arr / scales[:, None]), -127, 127).astype("i1")
        record["data"] = q.tobytes()
        record["scales"] = scales.tobytes()
    return pybase64.b64encode(msgpack.packb(record, use_bin_type=True)).decode("ascii")


def _unpack(blob: Any, point_id: Any) -> dict[str, Any]:
    if blob is None:
        raise CodecError(f"no '{TOKENS_KEY}' payload; re-ingest this image", point_id)
    if not isinstance(blob, (str, bytes)):
        raise CodecError(f"token blob must be a base64 string, got {type(blob).__name__}", point_id)
    if len(blob) > MAX_BLOB_CHARS:
        raise CodecError(f"token blob of {len(blob)} chars exceeds the {MAX_BLOB_CHARS} cap", point_id)
    try:
        raw = pybase64.b64decode(blob, validate=True)
    except (ValueError, TypeError) as exc:
        raise CodecError(f"token blob is not valid base64 ({exc})", point_id) from None
    try:
        record = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=len(raw),
            max_str_len=64,
            max_array_len=8,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise CodecError(f"token blob is not a valid msgpack record ({type(exc).__name__}: {exc})", point_id) from None
    if not isinstance(record, dict):
        raise CodecError(f"token blob holds a {type(record).__name__}, expected a map", point_id)
    return record


def _validated(record: dict[str, Any], point_id: Any, expected_shape: Sequence[int] | None) -> tuple[str, tuple[int, int]]:
    version = record.get("v")
    if version != CODEC_VERSION:
        raise CodecError(f"token blob version {version!r} is not supported (expected {CODEC_VERSION})", point_id)
    dtype = record.get("dtype")
    if dtype not in DTYPES:
        raise CodecError(f"token blob dtype {dtype!r} is not one of {', '.join(DTYPES)}", point_id)
    shape = record.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        or not (0 < shape[0] <= MAX_TOKENS and 0 < shape[1] <= MAX_DIM)
    ):
        raise CodecError(f"token blob shape {shape!r} is invalid", point_id)
    m, d = shape
    if expected_shape is not None and (m, d) != tuple(expected_shape):
        raise CodecError(f"token blob shape {m}x{d} does not match the model's {expected_shape[0]}x{expected_shape[1]}", point_id)
    data = record.get("data")
    if not isinstance(data, bytes) or len(data) != m * d * _ITEM_SIZE[dtype]:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise CodecError(f"token blob data has {got} bytes, expected {m * d * _ITEM_SIZE[dtype]} for {dtype} {m}x{d}", point_id)
    if dtype == "int8":
        scales = record.get("scales")
        if not isinstance(scales, bytes) or len(scales) != 2 * m:
            raise CodecError(f"int8 token blob needs {m} float16 scales", point_id)
    return dtype, (m, d)


def _fill(record: dict[str, Any], dtype: str, shape: tuple[int, int], out: np.ndarray) -> None:
    values = np.frombuffer(record["data"], dtype=_NP_DTYPE[dtype]).reshape(shape)
    if dtype == "int8":
        scales = np.frombuffer(record["scales"], dtype="<f2").astype(np.float32)
        np.multiply(values, scales[:, None], out=out, casting="unsafe")
    else:
        out[...] = values


@functools.lru_cache(maxsize=16)
def _canonical_layout(dtype: str, m: int, d: int) -> tuple[bytes, int, bytes]:
    """(bytes before the token data, data length, bytes between data and scales) of the record ``encode_tokens``
    writes for this dtype and shape: msgpack bytes equal to prefix + data + middle + scales are exactly a valid
    record (same map, same order), so they can be read without unpacking."""
    n = m * d * _ITEM_SIZE[dtype]
    record: dict[str, Any] = {"v": CODEC_VERSION, "dtype": dtype, "shape": [m, d], "data": b"\0" * n}
    if dtype == "int8":
        record["scales"] = b"\0" * (2 * m)
    raw = msgpack.packb(record, use_bin_type=True)
    start = raw.index(b"\xa4data") + 5
    start += {0xC4: 2, 0xC5: 3, 0xC6: 5}[raw[start]]
    middle = raw[start + n: len(raw) - 2 * m] if dtype == "int8" else b""
    return raw[:start], n, middle


def decode_canonical_into(blob: Any, out: np.ndarray) -> bool:
    """The fast path of ``decode_into``, alone: a blob in the canonical layout decoded into ``out`` (base64 decode
    + one copy, no msgpack objects). False when the blob is anything else; the full path then decides."""
    if not isinstance(blob, (str, bytes)) or len(blob) > MAX_BLOB_CHARS or out.ndim != 2:
        return False
    try:
        raw = pybase64.b64decode(blob, validate=True)
    except (ValueError, TypeError):
        return False
    m, d = out.shape
    for dtype in DTYPES:
        prefix, n, middle = _canonical_layout(dtype, m, d)
        p = len(prefix)
        extra = len(middle) + 2 * m if dtype == "int8" else 0
        if len(raw) != p + n + extra or not raw.startswith(prefix):
            continue
        values = np.frombuffer(raw, dtype=_NP_DTYPE[dtype], count=m * d, offset=p).reshape(m, d)
        if dtype == "int8":
            if raw[p + n: p + n + len(middle)] != middle:
                return False
            scales = np.frombuffer(raw, dtype="<f2", count=m, offset=p + n + len(middle)).astype(np.float32)
            np.multiply(values, scales[:, None], out=out, casting="unsafe")
        else:
            np.copyto(out, values, casting="unsafe")
        return True
    return False


def decode_into(blob: Any, out: np.ndarray, point_id: Any = None) -> None:
    """Decode one blob straight into ``out`` ([m, d], float16 or float32); raises CodecError on any defect."""
    if decode_canonical_into(blob, out):
        return
    record = _unpack(blob, point_id)
    dtype, shape = _validated(record, point_id, out.shape)
    _fill(record, dtype, shape, out)


def decode_tokens(blob: Any, point_id: Any = None, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """Blob -> float32 [m, d]."""
    record = _unpack(blob, point_id)
    dtype, shape = _validated(record, point_id, expected_shape)
    out = np.empty(shape, dtype=np.float32)
    _fill(record, dtype, shape, out)
    return out


def decode_batch(
    blobs: Sequence[Any], point_ids: Sequence[Any], shape: tuple[int, int], dtype: Any = np.float16
) -> tuple[np.ndarray, dict[int, CodecError]]:
    """Decode N blobs into one preallocated [N, m, d] array (float16 by default: a plain copy for fp16 blobs,
    the model upcasts on its device); bad rows are zero and listed by index."""
    out = np.empty((len(blobs), *shape), dtype=dtype)
    bad: dict[int, CodecError] = {}
    for i, (blob, pid) in enumerate(zip(blobs, point_ids)):
        try:
            decode_into(blob, out[i], pid)
        except CodecError as exc:
            out[i] = 0.0
            bad[i] = exc
    return out, bad
