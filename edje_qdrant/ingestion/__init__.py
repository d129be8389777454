"""Ingest: folder of images -> points (global vector + compressed tokens) in a store. See ``pipeline``."""
from __future__ import annotations

from .decode import DEFAULT_MAX_PIXELS, UnusableFile
from ..schema import POINT_NAMESPACE, point_id
from .pipeline import DEFAULT_FILE_TIMEOUT, IngestReport, ingest
from .walk import IMAGE_EXTENSIONS

__all__ = [
    "ingest",
    "IngestReport",
    "UnusableFile",
    "point_id",
    "POINT_NAMESPACE",
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_FILE_TIMEOUT",
]
