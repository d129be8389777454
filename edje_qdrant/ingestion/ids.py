"""Content-derived point ids: UUIDv5 (fixed project namespace) of the file's sha256.

The id depends only on the bytes, so the same picture under two paths is one point, a re-run finds
what is stored, and a changed file gets a new id.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


def sha256_bytes(data: bytes | memoryview) -> str:
    """sha256 hex digest of in-memory bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_stream(fh: BinaryIO) -> tuple[str, int]:
    """(sha256 hex digest, bytes read) of an open binary file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    while chunk := fh.read(_CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file."""
    with open(Path(path), "rb") as fh:
        return sha256_stream(fh)
