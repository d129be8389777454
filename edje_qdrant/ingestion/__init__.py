"""Ingest: folder of images -> points (global vector + compressed tokens) in a store. See ``pipeline``."""
from __future__ import annotations

from ..schema import POINT_NAMESPACE, point_id
from .decode import DEFAULT_MAX_PIXELS, UnusableFile
from .pipeline import ingest
from .steps import DEFAULT_FILE_TIMEOUT, IngestReport
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
