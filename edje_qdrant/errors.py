"""One exception family for the whole package; messages name the file/point/option and the fix."""
from __future__ import annotations


def install_hint(extra: str) -> str:
    """The two install commands of an optional extra: from PyPI, and from a checkout of the repository."""
    return f"pip install 'edje-qdrant[{extra}]' (from a checkout: pip install -e \".[{extra}]\")"


class EdjeError(Exception):
    """Base class of every error raised on purpose by edje-qdrant."""


class InputError(EdjeError, ValueError):
    """A caller passed a bad argument (query, k, folder, option)."""


class UnknownPointError(InputError):
    """A point id that is not in the collection (or not a point id at all)."""


class CodecError(EdjeError):
    """A stored token blob is malformed; ``point_id`` names the point it came from."""

    def __init__(self, message: str, point_id: object | None = None) -> None:
        self.point_id = point_id
        self.reason = message
        where = f"point {point_id}: " if point_id is not None else ""
        super().__init__(where + message)


class ModelError(EdjeError):
    """A model, preset or checkpoint cannot be built or loaded."""


class CheckpointKeyError(ModelError):
    """A checkpoint's keys or shapes do not match the model (lists them all)."""


class StoreError(EdjeError):
    """The vector store failed or cannot be opened."""


class StoreLockedError(StoreError):
    """The embedded store is already opened by another process."""


class ModelMismatchError(StoreError):
    """A collection was built with another model or codec than the one asked for."""
