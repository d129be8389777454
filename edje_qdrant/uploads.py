"""An uploaded query photo, held to the rules ingest applies to files: the formats the walk takes, and (when it is
decoded by ``Retriever.search_image``) the same pixel cap against decompression bombs. The byte cap is the
caller's: a service sets its own, far below ingest's 1 GiB per file.
"""
from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from edje_qdrant.ingestion.decode import DEFAULT_MAX_PIXELS, UnusableFile, register_plugins

# Pillow's names for the formats of the walk's IMAGE_EXTENSIONS (JPEG also opens the MPO files many cameras write;
# HEIF comes from pillow-heif, AVIF from Pillow >= 11.2 or pillow-heif).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "HEIF", "AVIF")


def check_upload(data: bytes, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """The Pillow format of an uploaded photo; UnusableFile when it is over ``max_bytes`` (error_type
    FileTooLarge), empty, not one of ``IMAGE_FORMATS`` (kind not_image), or its header says more than
    ``max_pixels`` (a decompression bomb). Only the header is read: no other Pillow plugin ever parses an upload."""
    if len(data) > max_bytes:
        raise UnusableFile(f"the photo is {len(data):,} bytes, over this service's limit of {max_bytes:,}",
                           "too_large", "FileTooLarge")
    if not data:
        raise UnusableFile("the photo is empty (0 bytes)", "empty", "EmptyFile")
    try:
        with Image.open(io.BytesIO(data), formats=_openable()) as im:
            width, height, fmt = im.width, im.height, str(im.format)
    except UnidentifiedImageError:
        raise UnusableFile(f"not an image in a format ingest reads ({', '.join(IMAGE_FORMATS)})", "not_image",
                           "UnidentifiedImageError") from None
    except Image.DecompressionBombError as exc:
        raise UnusableFile(f"refused by Pillow's decompression-bomb guard: {exc}", "too_large",
                           type(exc).__name__) from None
    except Exception as exc:  # a header Pillow cannot parse raises many kinds
        raise UnusableFile(f"cannot parse the image header: {exc}", "corrupt", type(exc).__name__) from None
    if width * height > max_pixels:
        raise UnusableFile(f"{width}x{height} = {width * height:,} pixels exceeds the cap of {max_pixels:,} "
                           "(decompression-bomb guard)", "too_large", "TooManyPixels")
    return fmt


def _openable() -> list[str]:
    """The ``IMAGE_FORMATS`` this Pillow can open (Pillow fails on a name it has no opener for)."""
    register_plugins()
    Image.init()
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]
