"""Known model fingerprints, cached per (preset, library versions, weight files' size and mtime).

A fingerprint hashes every weight, so computing it needs every tower loaded; with it cached, text search can
leave the vision tower unbuilt until an image is embedded. Best effort: an unreadable cache costs only speed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

from edje_qdrant.errors import ModelError
from edje_qdrant.models.dinov2 import cache_dir

log = logging.getLogger(__name__)


def cache_file() -> Path:
    return cache_dir() / "fingerprints.json"


def key(preset: str, sources: Sequence[Path] | Any) -> str | None:
    """sha256 of the preset name, library versions and every weight source's path, size and mtime; None when a
    source is missing (the factory then reports it with its own message)."""
    items: list[Any] = [preset]
    for package in ("edje-qdrant", "torch", "transformers", "safetensors"):
        try:
            items.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            items.append(f"{package}=?")
    try:
        for src in sources:
            st = Path(src).stat()
            items.append([str(Path(src).resolve()), st.st_size, st.st_mtime_ns])
    except (OSError, ModelError):
        return None
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _read() -> dict[str, str]:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def get(cache_key: str) -> str | None:
    value = _read().get(cache_key)
    return value if isinstance(value, str) else None


def put(cache_key: str, value: str) -> None:
    """Remember a computed fingerprint (atomic replace; a read-only cache folder is only logged)."""
    path = cache_file()
    data = _read()
    data[cache_key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not cache the model fingerprint in %s: %s", path, exc)
