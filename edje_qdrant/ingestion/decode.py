"""File bytes -> RGB PIL image, with the checks that keep a bad file from hurting the run.

Order matters: the size cap is checked from the header before any pixel is decoded (decompression
bombs), EXIF is read defensively, the orientation is applied, and every mode (palette, alpha, CMYK,
16-bit, float) ends as 8-bit RGB, with transparency composited on white. Large JPEGs are decoded at a
reduced DCT scale (``draft``) when the model only needs a small picture; reported width/height are
always the original ones.
"""
from __future__ import annotations

import io
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError, features

from ..errors import InputError
from .metadata import exif_fields, orientation, read_exif

# Below Pillow's own DecompressionBombWarning threshold (~89.5 MP), so Pillow never warns first.
DEFAULT_MAX_PIXELS = 80_000_000
MAX_FILE_BYTES = 1 << 30  # 1 GiB: no legitimate image under the pixel cap is larger

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}

_plugins_lock = threading.Lock()
_plugins_done = False


class UnusableFile(InputError):
    """A file that is skipped (and reported), not a reason to stop the run.

    ``kind`` is a short category (empty, not_image, truncated, corrupt, too_large, unreadable,
    vanished, timeout, preprocess), ``reason`` a sentence for people, ``error_type`` the underlying
    exception class name.
    """

    def __init__(self, reason: str, kind: str, error_type: str = "") -> None:
        self.reason = reason
        self.kind = kind
        self.error_type = error_type or kind
        super().__init__(reason)


@dataclass
class FileBytes:
    data: bytes
    size: int
    mtime: float


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, possibly reduced by draft
    width: int  # original, after EXIF orientation
    height: int
    format: str
    mime: str
    orientation: int
    exif: dict[str, Any] = field(default_factory=dict)  # taken_at, camera_make, camera_model, geo


def register_plugins() -> None:
    """Register the HEIF/HEIC opener from pillow-heif (AVIF is native in Pillow >= 11.2). Idempotent."""
    global _plugins_done
    with _plugins_lock:
        if _plugins_done:
            return
        try:
            import pillow_heif  # cost: HEIF decoders load once, when ingest registers the plugins

            pillow_heif.register_heif_opener()
            if not features.check("avif") and hasattr(pillow_heif, "register_avif_opener"):
                pillow_heif.register_avif_opener()  # older Pillow without native AVIF
        except ImportError:  # optional at runtime: HEIC files are then reported as not readable
            pass
        _plugins_done = True


def draft_size_for(vision: Any) -> int:
    """JPEG draft target for a vision tower: twice its input size (at least 256 px), 512 when it is unknown."""
    size = getattr(vision, "image_size", None)
    return max(2 * int(size), 256) if isinstance(size, int) and size > 0 else 512


def open_regular(path: str | os.PathLike[str]) -> tuple[BinaryIO, os.stat_result]:
    """Open a regular file for reading without ever blocking on a fifo; UnusableFile otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise UnusableFile("file disappeared before it could be read", "vanished", type(exc).__name__) from None
    except PermissionError as exc:
        raise UnusableFile("permission denied (cannot read the file)", "unreadable", type(exc).__name__) from None
    except OSError as exc:
        raise UnusableFile(f"cannot open: {exc.strerror or exc}", "unreadable", type(exc).__name__) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnusableFile("not a regular file", "unreadable", "NotARegularFile")
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def read_file(path: str | os.PathLike[str], max_bytes: int = MAX_FILE_BYTES) -> FileBytes:
    """Whole file content plus size and mtime (from the same open file)."""
    fh, st = open_regular(path)
    with fh:
        if st.st_size > max_bytes:
            raise UnusableFile(
                f"file is {st.st_size:,} bytes, over the {max_bytes:,}-byte cap for one image", "too_large", "FileTooLarge"
            )
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise UnusableFile(f"read error: {exc.strerror or exc}", "unreadable", type(exc).__name__) from None
    if len(data) > max_bytes:
        raise UnusableFile(f"file grew over the {max_bytes:,}-byte cap while read", "too_large", "FileTooLarge")
    return FileBytes(data=data, size=len(data), mtime=st.st_mtime)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> DecodedImage:
    """Image bytes -> ``DecodedImage`` (8-bit RGB, orientation applied); raises UnusableFile with a reason."""
    register_plugins()
    if not data:
        raise UnusableFile("empty file (0 bytes)", "empty", "EmptyFile")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnusableFile("not a readable image (unknown format or corrupt header)", "not_image",
                           type(exc).__name__) from None
    except Image.DecompressionBombError as exc:
        raise UnusableFile(f"refused by Pillow's decompression-bomb guard: {exc}", "too_large",
                           type(exc).__name__) from None
    except Exception as exc:
        raise UnusableFile(f"cannot parse the image header: {exc}", _kind(exc), type(exc).__name__) from None
    # No `with im`: closing would free the pixels we return; the source is an in-memory buffer.
    w, h = im.size
    if w <= 0 or h <= 0:
        raise UnusableFile(f"image header says {w}x{h} pixels", "corrupt", "BadSize")
    if w * h > max_pixels:
        raise UnusableFile(
            f"{w}x{h} = {w * h:,} pixels exceeds the cap of {max_pixels:,} (decompression-bomb guard); "
            "pass a larger max_pixels to ingest it",
            "too_large",
            "TooManyPixels",
        )
    fmt = im.format or ""
    mime = _mime(im)
    exif = read_exif(im)
    orient = orientation(exif)
    fields = exif_fields(exif)
    try:
        if draft_size and fmt == "JPEG" and min(w, h) >= 2 * draft_size:
            im.draft(im.mode, (draft_size, draft_size))
        im.load()
        rgb = to_rgb(im)
        if orient in _TRANSPOSE:
            rgb = rgb.transpose(_TRANSPOSE[orient])
    except Exception as exc:
        raise UnusableFile(f"cannot decode the pixels: {exc or type(exc).__name__}", _kind(exc),
                           type(exc).__name__) from None
    if orient in (5, 6, 7, 8):
        w, h = h, w
    return DecodedImage(image=rgb, width=w, height=h, format=fmt, mime=mime, orientation=orient, exif=fields)


def _kind(exc: Exception) -> str:
    return "truncated" if isinstance(exc, EOFError) or "truncat" in str(exc).lower() else "corrupt"


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha/transparency composited on white, 16-bit/float rescaled."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
    else:
        arr = arr.astype(np.float64)
        if im.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit range -> 8-bit
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _mime(im: Image.Image) -> str:
    try:
        mime = im.get_format_mimetype()
    except Exception:
        mime = None
    if not mime and im.format:
        mime = Image.MIME.get(im.format.upper())
    return mime or "application/octet-stream"
