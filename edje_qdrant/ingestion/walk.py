"""Recursive, deterministic walk over image files that survives whatever a real disk holds.

Entries are visited in byte order of their names (pre-order: a directory's contents come at its
place in the listing). Directory symlinks are followed, but every directory is entered at most once
(keyed by device + inode), so symlink loops and two links to one folder cost nothing. Problems that
concern an image-named entry (broken link, link loop, fifo, unlistable folder) come out as
``WalkError`` so the caller can count and report them; everything else that is not an image file is
ignored silently (captions, ``.DS_Store`` ...).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif",
        ".png",
        ".webp",
        ".gif",
        ".bmp", ".dib",
        ".tif", ".tiff",
        ".heic", ".heif", ".hif",
        ".avif",
    }
)


@dataclass(frozen=True)
class WalkItem:
    """A regular file (or a link to one) with an image extension."""

    path: Path  # root joined with the names walked (links not resolved)
    folder: str  # parent folder relative to the root, "/"-separated, "" for the root itself


@dataclass(frozen=True)
class WalkError:
    """An image-named entry (or a folder) the walk could not use."""

    path: Path
    reason: str
    error_type: str


def is_image_name(name: str) -> bool:
    """True when the name ends with one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def display_path(path: str | os.PathLike[str]) -> str:
    """Valid-UTF-8 text for a path: undecodable bytes become ``\\xNN`` (payloads and JSON need real text)."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


def _key(entry: os.DirEntry[str]) -> bytes:
    return os.fsencode(entry.name)


def walk_images(root: str | os.PathLike[str]) -> Iterator[WalkItem | WalkError]:
    """Yield image files under ``root`` (a directory) in a fixed order, plus ``WalkError`` for bad entries."""
    root_path = Path(root)
    try:
        st = os.stat(root_path)
    except OSError as exc:
        yield WalkError(root_path, f"cannot open folder: {exc.strerror or exc}", type(exc).__name__)
        return
    visited: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    # Stack of (folder path, its relative name, iterator over its sorted entries).
    stack: list[tuple[Path, str, Iterator[os.DirEntry[str]]]] = []
    listing = _list(root_path)
    if isinstance(listing, WalkError):
        yield listing
        return
    stack.append((root_path, "", iter(listing)))
    while stack:
        folder, rel, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        path = folder / entry.name
        image_name = is_image_name(entry.name)
        if not image_name:
            try:
                if not entry.is_dir():  # d_type, no syscall for plain files; links are followed
                    continue
            except OSError:
                continue
        try:
            st = os.stat(path)  # follows links
        except FileNotFoundError as exc:
            if entry.is_symlink():
                if image_name:
                    yield WalkError(path, "broken symbolic link (its target does not exist)", type(exc).__name__)
            else:
                log.debug("vanished while walking: %s", display_path(path))
            continue
        except OSError as exc:
            if image_name:
                reason = "symbolic link loop" if exc.errno == errno.ELOOP else f"cannot stat: {exc.strerror or exc}"
                yield WalkError(path, reason, type(exc).__name__)
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in visited:
                log.debug("folder already visited (symlink loop or second link), skipped: %s", display_path(path))
                continue
            visited.add(key)
            listing = _list(path)
            if isinstance(listing, WalkError):
                yield listing
                continue
            stack.append((path, f"{rel}/{entry.name}" if rel else entry.name, iter(listing)))
        elif image_name:
            if stat.S_ISREG(st.st_mode):
                yield WalkItem(path, display_path(rel) if rel else "")
            else:
                yield WalkError(path, "not a regular file (fifo, socket or device)", "NotARegularFile")


def _list(folder: Path) -> list[os.DirEntry[str]] | WalkError:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=_key)
    except OSError as exc:
        return WalkError(folder, f"cannot list folder: {exc.strerror or exc}", type(exc).__name__)
