"""Captions files: a TSV with header ``image<TAB>caption_idx<TAB>split<TAB>caption`` (Flickr8k layout)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from edje_qdrant.errors import InputError

REQUIRED_COLUMNS = ("image", "split", "caption")


@dataclass(frozen=True)
class CaptionSet:
    """Captions of one split: ``images`` (unique file names, sorted) and per-caption image index and text."""

    images: list[str]
    caption_image: list[int]
    captions: list[str]


def read_captions(path: str | Path) -> list[dict[str, str]]:
    """Read every row of a captions TSV; raise ``InputError`` naming the file and missing column."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"captions file {path} does not exist; pass --captions with a TSV "
                         "(columns image, caption_idx, split, caption)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"captions file {path}: missing column(s) {missing}; the header must be "
                             "image<TAB>caption_idx<TAB>split<TAB>caption")
        rows = [r for r in reader if r.get("image") and r.get("caption") is not None]
    if not rows:
        raise InputError(f"captions file {path} has no caption rows")
    return rows


def caption_set(rows: list[dict[str, str]], split: str) -> CaptionSet:
    """Captions of one split, images in sorted order, captions in file order."""
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        splits = sorted({r["split"] for r in rows})
        raise InputError(f"no captions with split {split!r}; the file has splits {splits}")
    images = sorted({r["image"] for r in chosen})
    index = {name: i for i, name in enumerate(images)}
    return CaptionSet(images=images, caption_image=[index[r["image"]] for r in chosen],
                      captions=[r["caption"].strip() for r in chosen])
