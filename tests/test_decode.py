"""Decoding: formats, EXIF orientation and fields, mode conversion, bomb cap, broken bytes."""
from __future__ import annotations

import io

import pytest
from PIL import Image

import imagegen as g
from edje_qdrant.errors import InputError
from edje_qdrant.ingestion.decode import UnusableFile, decode_image, read_file, to_rgb
from edje_qdrant.ingestion.metadata import exif_fields, orientation


def decode(path, **kw):
    return decode_image(read_file(path).data, **kw)


@pytest.mark.parametrize(
    "name,fmt,mime",
    [("a.jpg", "JPEG", "image/jpeg"), ("a.png", "PNG", "image/png"), ("a.webp", "WEBP", "image/webp"),
     ("a.gif", "GIF", "image/gif"), ("a.bmp", "BMP", "image/bmp"), ("a.tif", "TIFF", "image/tiff"),
     ("a.avif", "AVIF", "image/avif")],
)
def test_formats_decode_to_rgb_with_original_size(tmp_path, name, fmt, mime):
    p = g.make_image(tmp_path / name, fmt, size=(64, 48))
    out = decode(p)
    assert (out.width, out.height) == (64, 48)
    assert out.image.mode == "RGB" and out.image.size == (64, 48)
    assert out.format == fmt and out.mime == mime


def test_heic(tmp_path):
    reason = g.heif_supported()
    if reason:
        pytest.skip(reason)
    out = decode(g.make_heic(tmp_path / "a.heic", size=(64, 48)))
    assert (out.width, out.height) == (64, 48) and out.image.mode == "RGB"
    assert out.mime in ("image/heic", "image/heif")


def test_gif_first_frame(tmp_path):
    out = decode(g.make_animated_gif(tmp_path / "anim.gif", colors=((255, 0, 0), (0, 0, 255))))
    assert out.image.getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("orient,swapped", [(1, False), (2, False), (3, False), (5, True), (6, True), (8, True)])
def test_exif_orientation_applied(tmp_path, orient, swapped):
    img = Image.new("RGB", (60, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    p = g.save(tmp_path / "o.jpg", img, "JPEG", quality=95, exif=g.make_exif(orientation=orient))
    out = decode(p)
    assert out.orientation == orient
    assert (out.width, out.height) == ((20, 60) if swapped else (60, 20))
    assert out.image.size == (out.width, out.height)
    if orient == 6:  # rotate 90 clockwise: the left band ends on top
        assert out.image.getpixel((10, 2))[0] > 200 and out.image.getpixel((10, 57))[2] > 200
    if orient == 3:
        assert out.image.getpixel((57, 10))[0] > 200


def test_exif_fields(tmp_path):
    exif = g.make_exif(taken_at="2023:07:14 18:30:05", make="Canon\x00", model=" EOS R6 ", gps=(-33.8568, 151.2153))
    out = decode(g.make_image(tmp_path / "e.jpg", "JPEG", exif=exif))
    assert out.exif["taken_at"] == "2023-07-14T18:30:05"
    assert out.exif["camera_make"] == "Canon" and out.exif["camera_model"] == "EOS R6"
    assert out.exif["geo"]["lat"] == pytest.approx(-33.8568, abs=1e-4)
    assert out.exif["geo"]["lon"] == pytest.approx(151.2153, abs=1e-4)
    plain = decode(g.make_image(tmp_path / "plain.jpg", "JPEG"))
    assert plain.exif == {} and plain.orientation == 1


def test_bad_exif_values_are_dropped_not_fatal(tmp_path):
    exif = g.make_exif(orientation=42, taken_at="yesterday", gps=(0.0, 0.0))
    exif.get_ifd(g.GPS_IFD)[2] = (1.0, 2.0)  # malformed latitude
    out = decode(g.make_image(tmp_path / "bad.jpg", "JPEG", exif=exif))
    assert out.orientation == 1 and out.exif == {}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_corrupt_exif_block_does_not_fail_the_image(tmp_path):
    p = g.make_image(tmp_path / "c.jpg", "JPEG", quality=90)
    buf = io.BytesIO()
    Image.open(p).save(buf, "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\xff\xff\xff\xffgarbage")
    out = decode_image(buf.getvalue())
    assert out.image.size == (64, 48) and out.orientation == 1 and out.exif == {}
    assert orientation(None) == 1 and exif_fields(None) == {}


def test_cmyk_palette_16bit_alpha_converted(tmp_path):
    cmyk = decode(g.make_cmyk_jpeg(tmp_path / "cmyk.jpg"))
    r, gr, b = cmyk.image.getpixel((4, 4))
    assert r > 200 and gr < 60 and b < 60
    pal = decode(g.make_palette_transparent_png(tmp_path / "pal.png"))
    assert pal.image.getpixel((2, 2)) == (255, 255, 255)  # transparent -> white
    assert pal.image.getpixel((30, 2)) == (255, 0, 0)
    deep = decode(g.make_16bit_png(tmp_path / "16.png", value=40000))
    assert deep.image.getpixel((1, 1)) == (156, 156, 156)  # 40000 / 257, not clipped to 255
    la = decode(g.make_la_png(tmp_path / "la.png"))
    assert la.image.getpixel((2, 2)) == (255, 255, 255) and la.image.getpixel((30, 2)) == (0, 0, 0)
    rgba = decode(g.make_rgba_png(tmp_path / "rgba.png", alpha=0))
    assert rgba.image.getpixel((0, 0)) == (255, 255, 255)
    for mode in ("1", "L", "I", "F", "YCbCr", "RGBA", "P"):
        assert to_rgb(g.pattern((8, 8), mode=mode)).mode == "RGB"


def test_pixel_cap(tmp_path):
    p = g.make_image(tmp_path / "big.png", "PNG", size=(64, 48))
    with pytest.raises(UnusableFile) as info:
        decode(p, max_pixels=64 * 48 - 1)
    assert info.value.kind == "too_large" and "max_pixels" in info.value.reason and "3,072" in info.value.reason
    assert decode(p, max_pixels=64 * 48).width == 64


def test_header_bomb_refused_before_decoding(tmp_path):
    with pytest.raises(UnusableFile) as info:
        decode(g.make_png_header_bomb(tmp_path / "bomb.png", 9000, 9000))
    assert info.value.kind == "too_large" and "81,000,000" in info.value.reason
    with pytest.raises(UnusableFile) as info:  # beyond Pillow's own hard limit too
        decode(g.make_png_header_bomb(tmp_path / "bomb2.png"), max_pixels=10**11)
    assert info.value.kind == "too_large"


@pytest.mark.parametrize(
    "maker,kind",
    [(g.make_empty, "empty"), (g.make_text_as_image, "not_image"), (g.make_bad_header, "not_image"),
     (lambda p: g.make_truncated(p, "PNG"), "truncated"), (lambda p: g.make_truncated(p, "JPEG", keep=0.3), "truncated")],
)
def test_broken_files_raise_unusable_with_reason(tmp_path, maker, kind):
    p = maker(tmp_path / "x.png")
    with pytest.raises(UnusableFile) as info:
        decode(p)
    assert info.value.kind == kind and info.value.reason and info.value.error_type
    assert isinstance(info.value, InputError)


def test_read_file_errors(tmp_path):
    with pytest.raises(UnusableFile) as info:
        read_file(tmp_path / "gone.jpg")
    assert info.value.kind == "vanished"
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(UnusableFile) as info:
        read_file(tmp_path / "dir.jpg")
    assert info.value.kind == "unreadable"
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 2048)
    with pytest.raises(UnusableFile) as info:
        read_file(big, max_bytes=1024)
    assert info.value.kind == "too_large"


def test_large_jpeg_drafted_but_reports_original_size(tmp_path):
    p = g.make_image(tmp_path / "large.jpg", "JPEG", size=(2048, 1536), quality=85)
    out = decode(p, draft_size=256)
    assert (out.width, out.height) == (2048, 1536)
    assert 256 <= min(out.image.size) < 1536  # decoded at a reduced DCT scale
    full = decode(p)
    assert full.image.size == (2048, 1536)
