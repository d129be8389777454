"""Test-time image generators (Pillow): real files in every format the ingest reads, plus broken ones.

Nothing binary is committed; every test builds what it needs in ``tmp_path``. Images are small
(~64 px) and seeded, so two calls with different seeds give different bytes (different point ids).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
EXIF_MAKE = 0x010F
EXIF_MODEL = 0x0110
EXIF_IFD = 0x8769
GPS_IFD = 0x8825
DATETIME_ORIGINAL = 0x9003


def pattern(size: tuple[int, int] = (64, 48), seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A seeded noisy gradient in ``mode`` (so each seed gives different pixels and bytes)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, (seed * 37) % 256)], -1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    rgb = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


def make_exif(
    orientation: int | None = None,
    taken_at: str | None = None,
    make: str | None = None,
    model: str | None = None,
    gps: tuple[float, float] | None = None,
) -> Image.Exif:
    """An EXIF block with the given fields (``taken_at`` as ``YYYY:MM:DD HH:MM:SS``, gps as (lat, lon))."""
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    if make is not None:
        exif[EXIF_MAKE] = make
    if model is not None:
        exif[EXIF_MODEL] = model
    if taken_at is not None:
        exif.get_ifd(EXIF_IFD)[DATETIME_ORIGINAL] = taken_at
    if gps is not None:
        lat, lon = gps
        ifd = exif.get_ifd(GPS_IFD)
        ifd[1] = "N" if lat >= 0 else "S"
        ifd[2] = _dms(abs(lat))
        ifd[3] = "E" if lon >= 0 else "W"
        ifd[4] = _dms(abs(lon))
    return exif


def _dms(value: float) -> tuple[float, float, float]:
    d = int(value)
    m = int((value - d) * 60)
    s = round((value - d - m / 60) * 3600, 4)
    return (float(d), float(m), s)


def save(path: Path, image: Image.Image, fmt: str | None = None, **kwargs: Any) -> Path:
    """Save ``image`` at ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)
    return path


def make_image(path: Path, fmt: str | None = None, size: tuple[int, int] = (64, 48), seed: int = 0,
               mode: str = "RGB", **kwargs: Any) -> Path:
    """A patterned image in ``mode`` written as ``fmt`` (by extension when None)."""
    return save(path, pattern(size, seed, mode), fmt, **kwargs)


def heif_supported() -> str | None:
    """None when pillow-heif can write HEIF here, else the reason to skip."""
    try:
        import pillow_heif
    except ImportError:
        return "pillow-heif is not installed"
    if not pillow_heif.libheif_info().get("HEIF"):
        return "pillow-heif has no HEVC encoder in this build"
    return None


def make_heic(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0, exif: Image.Exif | None = None) -> Path:
    """A real HEIC file written by pillow-heif (check ``heif_supported()`` first)."""
    import pillow_heif

    path.parent.mkdir(parents=True, exist_ok=True)
    heif = pillow_heif.from_pillow(pattern(size, seed))
    kwargs: dict[str, Any] = {"quality": 80}
    if exif is not None:
        kwargs["exif"] = exif.tobytes()
    heif.save(str(path), **kwargs)
    return path


def make_animated_gif(path: Path, colors: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 0, 255)),
                      size: tuple[int, int] = (32, 32)) -> Path:
    """A GIF whose frames are solid ``colors`` (frame 0 first)."""
    frames = [Image.new("RGB", size, c) for c in colors]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def make_palette_transparent_png(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    """Palette PNG whose index 0 is transparent (fully transparent black -> white after compositing)."""
    im = Image.new("P", size, 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    for x in range(size[0] // 2):
        for y in range(size[1]):
            im.putpixel((x + size[0] // 2, y), 1)
    return save(path, im, "PNG", transparency=0)


def make_la_png(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    """Grey + alpha PNG: black everywhere, alpha 0 (transparent) on the left half."""
    alpha = np.zeros((size[1], size[0]), np.uint8)
    alpha[:, size[0] // 2:] = 255
    im = Image.merge("LA", [Image.new("L", size, 0), Image.fromarray(alpha)])
    return save(path, im, "PNG")


def make_rgba_png(path: Path, size: tuple[int, int] = (32, 32), alpha: int = 0) -> Path:
    """Solid black RGBA PNG with uniform ``alpha``."""
    return save(path, Image.new("RGBA", size, (0, 0, 0, alpha)), "PNG")


def make_16bit_png(path: Path, size: tuple[int, int] = (32, 32), value: int = 40000) -> Path:
    """16-bit greyscale PNG filled with ``value`` (0-65535)."""
    arr = np.full((size[1], size[0]), value, dtype=np.uint16)
    return save(path, Image.fromarray(arr), "PNG")


def make_cmyk_jpeg(path: Path, size: tuple[int, int] = (32, 32), cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> Path:
    """CMYK JPEG (default: pure red ink)."""
    return save(path, Image.new("CMYK", size, cmyk), "JPEG", quality=95)


# ---- broken files ----------------------------------------------------------------------------

def make_empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_text_as_image(path: Path) -> Path:
    """A text file with an image extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not an image\n" * 20)
    return path


def make_truncated(path: Path, fmt: str = "PNG", size: tuple[int, int] = (64, 64), keep: float = 0.5) -> Path:
    """A valid image cut to ``keep`` of its bytes (header intact, pixels missing)."""
    make_image(path, fmt, size=size, seed=99)
    data = path.read_bytes()
    path.write_bytes(data[: max(64, int(len(data) * keep))])
    return path


def make_bad_header(path: Path) -> Path:
    """A PNG whose IHDR chunk has a wrong checksum: recognised as PNG, refused as corrupt."""
    ihdr = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + b"\x00\x00\x00\x00"
                     + b"\x00garbage" * 16)
    return path


def make_png_header_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def make_slow_png(path: Path, size: tuple[int, int] = (5000, 5000)) -> Path:
    """A large, highly compressible PNG: a small file that takes long (~0.3 s+) to decode and resize."""
    w, h = size
    row = (np.arange(w, dtype=np.uint32) % 251).astype(np.uint8)
    arr = np.broadcast_to(row, (h, w))
    return save(path, Image.fromarray(np.ascontiguousarray(arr)), "PNG", compress_level=1)


def build_sample_folder(root: Path, heic: bool = True) -> dict[str, list[str]]:
    """A folder tree with good images in many formats and broken files of several kinds.

    Returns {"good": [relative paths], "bad": [relative paths]}; ``heic`` adds one HEIC when the
    encoder is available.
    """
    good = {
        "a.jpg": lambda p: make_image(p, "JPEG", seed=1, quality=90),
        "b.png": lambda p: make_image(p, "PNG", seed=2),
        "sub/c.webp": lambda p: make_image(p, "WEBP", seed=3, quality=90),
        "sub/d.gif": lambda p: make_image(p, "GIF", seed=4),
        "sub/deeper/e.bmp": lambda p: make_image(p, "BMP", seed=5),
        "sub/deeper/f.tiff": lambda p: make_image(p, "TIFF", seed=6),
        "g_cmyk.jpg": lambda p: make_cmyk_jpeg(p),
        "h_palette.png": lambda p: make_palette_transparent_png(p),
        "i_16bit.png": lambda p: make_16bit_png(p),
        "j_la.png": lambda p: make_la_png(p),
    }
    bad = {
        "bad/empty.jpg": make_empty,
        "bad/notes.png": make_text_as_image,
        "bad/truncated.png": lambda p: make_truncated(p, "PNG"),
        "bad/header.png": make_bad_header,
    }
    if heic and heif_supported() is None:
        good["sub/k.heic"] = lambda p: make_heic(p, seed=7)
    for rel, fn in {**good, **bad}.items():
        fn(root / rel)
    (root / "a.jpg.txt").write_text("a caption for a\n")
    (root / "README.txt").write_text("not an image, ignored\n")
    return {"good": sorted(good), "bad": sorted(bad)}
