"""EXIF facts for the payload: orientation, capture time, camera, GPS.

Every reader is defensive: corrupt or odd EXIF drops the field, never the image.
"""
from __future__ import annotations

import logging
import math
import re
from datetime import datetime
from typing import Any

from PIL import Image

from ..schema import CAMERA_MAKE_KEY, CAMERA_MODEL_KEY, GEO_KEY, TAKEN_AT_KEY

log = logging.getLogger(__name__)

_ORIENTATION = 0x0112
_MAKE = 0x010F
_MODEL = 0x0110
_EXIF_IFD = 0x8769
_GPS_IFD = 0x8825
_DATETIME_ORIGINAL = 0x9003
_OFFSET_TIME_ORIGINAL = 0x9011
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4

_OFFSET_RE = re.compile(r"^[+-]\d{2}:\d{2}$")


def read_exif(image: Image.Image) -> Image.Exif | None:
    """The image's EXIF block, or None when absent or unreadable."""
    try:
        exif = image.getexif()
    except Exception as exc:  # corrupt EXIF: Pillow raises many kinds
        log.debug("unreadable EXIF: %s", exc)
        return None
    return exif if len(exif) else None


def orientation(exif: Image.Exif | None) -> int:
    """EXIF orientation 1-8 (1 when absent or invalid)."""
    if exif is None:
        return 1
    try:
        value = int(exif.get(_ORIENTATION, 1))
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def exif_fields(exif: Image.Exif | None) -> dict[str, Any]:
    """``taken_at``, ``camera_make``, ``camera_model``, ``geo`` when present and valid; other keys omitted."""
    out: dict[str, Any] = {}
    if exif is None:
        return out
    for key, tag in ((CAMERA_MAKE_KEY, _MAKE), (CAMERA_MODEL_KEY, _MODEL)):
        text = _text(_safe(lambda t=tag: exif.get(t)))
        if text:
            out[key] = text
    sub = _safe(lambda: exif.get_ifd(_EXIF_IFD)) or {}
    taken = _taken_at(_safe(lambda: sub.get(_DATETIME_ORIGINAL)), _safe(lambda: sub.get(_OFFSET_TIME_ORIGINAL)))
    if taken:
        out[TAKEN_AT_KEY] = taken
    gps = _safe(lambda: exif.get_ifd(_GPS_IFD)) or {}
    geo = _safe(lambda: _geo(gps))
    if geo:
        out[GEO_KEY] = geo
    return out


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        log.debug("bad EXIF field: %s", exc)
        return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    text = value.replace("\x00", " ").strip()
    # Keep it valid UTF-8 (lone surrogates cannot be stored) and short.
    text = text.encode("utf-8", "replace").decode("utf-8")[:128]
    return text or None


def _taken_at(value: Any, offset: Any) -> str | None:
    text = _text(value)
    if not text:
        return None
    try:
        stamp = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    iso = stamp.isoformat()
    off = _text(offset)
    if off and _OFFSET_RE.match(off):
        iso += off
    return iso


def _degrees(value: Any) -> float | None:
    try:
        d, m, s = (float(x) for x in value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    deg = d + m / 60.0 + s / 3600.0
    return deg if math.isfinite(deg) else None


def _geo(gps: Any) -> dict[str, float] | None:
    lat = _degrees(gps.get(_GPS_LAT))
    lon = _degrees(gps.get(_GPS_LON))
    if lat is None or lon is None:
        return None
    if (_text(gps.get(_GPS_LAT_REF)) or "N").upper().startswith("S"):
        lat = -lat
    if (_text(gps.get(_GPS_LON_REF)) or "E").upper().startswith("W"):
        lon = -lon
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
        return None
    if lat == 0.0 and lon == 0.0:  # "null island": a camera without a fix
        return None
    return {"lat": round(lat, 7), "lon": round(lon, 7)}
