"""Keep a collection equal to the folder being ingested: where each stored picture lives now.

A point is one picture's content (id = UUIDv5 of its sha256), so a file is not a point: the same bytes can
sit at several paths, under several ingested roots. Each point records them in ``metadata.locations``
(``[{"source", "folder"}]``, the first one is the point's ``source``/``folder``; older points without the
list count as ``[{source, folder}]``). After a complete walk of ``root``:

- a location under ``root`` where the walk did not find this content is *stale*: with ``prune`` it is
  dropped, and a point left with no location is deleted (a deleted file, the old content of a changed file);
- paths where the walk found the content are added (a moved/renamed file, a new copy): no re-encoding;
- the first location is always one that still holds the content when there is one (the point "moves");
- locations outside ``root`` are never touched (another ingested folder owns them), nor are paths the walk
  could not read (a failed file, or anything under a folder it could not list): they keep their points.
Paths are compared as written (absolute, links not resolved), ``root`` by whole path components.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..schema import (FOLDER_KEY, LOCATIONS_KEY, METADATA_KEY, MTIME_KEY, PAGE_CONTENT_KEY, SOURCE_KEY,
                      stored_locations)
from .steps import caption_of
from .walk import display_path

log = logging.getLogger(__name__)



def under(path: str, root: str) -> bool:
    """True when ``path`` is inside the folder ``root`` (whole components: /a/bc is not under /a/b)."""
    prefix = root if root.endswith("/") else root + "/"
    return path.startswith(prefix)


@dataclass
class Unreadable:
    """Paths the walk met but could not use: their points are kept as they are."""

    files: set[str] = field(default_factory=set)
    folders: list[str] = field(default_factory=list)

    def __call__(self, path: str) -> bool:
        return path in self.files or any(path == f or under(path, f) for f in self.folders)


def relocate(old: list[dict[str, str]], found: list[dict[str, str]], root: str, unreadable: Callable[[str], bool],
             prune: bool) -> list[dict[str, str]]:
    """New locations of one point: ``old`` as stored, ``found`` where this walk met its content (walk order).

    Returns ``[]`` when the point is to be deleted (every location was stale and ``prune`` is on).
    """
    found_paths = {x[SOURCE_KEY] for x in found}

    def stale(loc: dict[str, str]) -> bool:
        path = loc[SOURCE_KEY]
        return under(path, root) and path not in found_paths and not unreadable(path)

    kept = [x for x in old if not (prune and stale(x))]
    known = {x[SOURCE_KEY] for x in kept}
    new = kept + [x for x in found if x[SOURCE_KEY] not in known]
    if new and stale(new[0]):  # the point's own path is gone: take the first that still holds it
        fresh = next((x for x in new if not stale(x)), None)
        if fresh is not None:
            new.remove(fresh)
            new.insert(0, fresh)
    return new


def sync_collection(store: Any, collection: str, root: Path, found: dict[str, list[dict[str, str]]],
                    unreadable: Unreadable, prune: bool, report: Any) -> None:
    """After a complete walk of ``root`` and every upsert: rewrite the locations of points whose files moved,
    then (with ``prune``) delete the points left with none. ``found``: point id -> where this walk met its
    content; ``report`` gets ``removed``, ``moved`` and ``prune_skipped``."""
    if report.seen == 0:
        report.prune_skipped = "no images found"
        return
    if not prune:
        report.prune_skipped = "prune is off"
    elif not found:
        report.prune_skipped = "no image could be read"
        prune = False
    if prune:  # every point: the stale ones are not in `found`
        candidates = store.scroll(collection, [METADATA_KEY])
    else:
        ids = list(found)
        candidates = (h for start in range(0, len(ids), 1024)
                      for h in store.retrieve(collection, ids[start:start + 1024], [METADATA_KEY]))
    shown_root = display_path(root)
    updates: dict[str, dict[str, Any]] = {}
    stale: list[str] = []
    for hit in candidates:
        meta = dict(hit.payload.get(METADATA_KEY) or {})
        old = stored_locations(meta)
        new = relocate(old, found.get(hit.id, []), shown_root, unreadable, prune)
        if new == old:
            continue
        if not new:
            stale.append(hit.id)
            continue
        updates[hit.id], moved = _relocated(meta, new)
        report.moved += moved
    log.info("sync %s: updating the paths of %d points, then removing %d stale points", shown_root, len(updates),
             len(stale))
    if updates:
        store.update_payloads(collection, updates)
    if stale:
        store.delete(collection, stale)
        report.removed = len(stale)


def _relocated(meta: dict[str, Any], locations: list[dict[str, str]]) -> tuple[dict[str, Any], int]:
    """Payload keys to rewrite for a point whose locations changed (its source too when that moved), and
    whether it moved (1) or only gained/lost other locations (0)."""
    first = locations[0]
    out = {**meta, LOCATIONS_KEY: locations, FOLDER_KEY: first[FOLDER_KEY]}
    if meta.get(SOURCE_KEY) == first[SOURCE_KEY]:
        return {METADATA_KEY: out}, 0
    out[SOURCE_KEY] = first[SOURCE_KEY]
    path = Path(first[SOURCE_KEY])
    try:
        out[MTIME_KEY] = os.stat(path).st_mtime
    except OSError:
        pass
    return {METADATA_KEY: out, PAGE_CONTENT_KEY: caption_of(path) or display_path(path.name)}, 1
