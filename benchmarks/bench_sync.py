"""7. What keeping the collection in sync with the folder costs (issue 12): the store calls of the sync on an Edge
collection with real-size token blobs (scroll of every point's metadata, payload updates of moved files, deletes),
and a re-ingest of an unchanged folder with the sync (prune) against one without it, interleaved in one run.

    python benchmarks/bench_sync.py [--quick] [--points N] [--images M]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import _common as C
from bench_search import build_collection
from edje_qdrant.ingestion import ingest
from edje_qdrant.models import load_model
from edje_qdrant.store import EdgeStore


def store_calls(n: int, workdir: str | None) -> dict[str, Any]:
    """Seconds of each sync store call on ``n`` points (tiny-random codec: 64x384 fp16 blobs, ~49 kB each)."""
    model = load_model("tiny-random", device="cpu")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = EdgeStore(tmp)
        build_collection(store, "sync", n, model)
        ids_only = C.measure(lambda: sum(1 for _ in store.scroll("sync", [])), reps=3)
        with_meta = C.measure(lambda: sum(1 for _ in store.scroll("sync", ["metadata"])), reps=3)
        hits = list(store.scroll("sync", ["metadata"]))
        moved = {h.id: {"metadata": {**h.payload["metadata"], "source": "moved/" + h.payload["metadata"]["source"]}}
                 for h in hits[: max(1, n // 100)]}
        update = C.measure(lambda: store.update_payloads("sync", moved), warmup=0, reps=1)
        stale = [h.id for h in hits[-max(1, n // 10):]]
        delete = C.measure(lambda: store.delete("sync", stale), warmup=0, reps=1)
        assert store.count("sync") == n - len(stale)
        store.close()
    scan = statistics.median(with_meta)
    photo = np.random.default_rng(1).bytes(3_000_000)  # a typical 3 MB photo, hashed from memory (no disk read)
    hash_s = statistics.median(C.measure(lambda: hashlib.sha256(photo).digest(), reps=20))
    return {
        "points": n,
        "scroll_ids_s": round(statistics.median(ids_only), 4),
        "scroll_metadata_s": round(scan, 4),
        "scroll_metadata_points_per_s": round(n / scan),
        "update_payloads_s": round(update[0], 4),
        "delete_s": round(delete[0], 4),
        "sha256_3mb_s": round(hash_s, 5),
        "scan_per_point_vs_hash_3mb": round(scan / n / hash_s, 4),
        "updated": len(moved),
        "deleted": len(stale),
    }


def reingest_overhead(m: int, workdir: str | None) -> dict[str, Any]:
    """A re-run over an unchanged folder of ``m`` images: prune=True (the default) against prune=False."""
    model = load_model("tiny-random", device="cpu")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp) / "imgs"
        for i in range(m):
            folder = root / f"d{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        store = EdgeStore(Path(tmp) / "store")
        assert ingest(root, store, model).ingested == m
        no_prune, prune = C.measure_pair(lambda: ingest(root, store, model, prune=False),
                                         lambda: ingest(root, store, model), reps=5)
        assert ingest(root, store, model).removed == 0
        store.close()
    a, b = statistics.median(no_prune), statistics.median(prune)
    return {"images": m, "reingest_no_prune_s": round(a, 3), "reingest_prune_s": round(b, 3),
            "sync_overhead_ratio": round(b / a, 3)}


def run(quick: bool = False, points: int | None = None, images: int | None = None,
        workdir: str | None = None) -> dict[str, Any]:
    calls = store_calls(points or (1000 if quick else 10_000), workdir)
    overhead = reingest_overhead(images or (60 if quick else 400), workdir)
    C.table("Sync store calls (Qdrant Edge, real-size token blobs)", ["call", "seconds / rate"], [
        [f"scroll ids of {calls['points']} points", f"{calls['scroll_ids_s']} s"],
        [f"scroll metadata of {calls['points']} points", f"{calls['scroll_metadata_s']} s "
                                                         f"({calls['scroll_metadata_points_per_s']:,} points/s)"],
        [f"update_payloads ({calls['updated']} moved, one flush)", f"{calls['update_payloads_s']} s"],
        [f"delete ({calls['deleted']} stale, one flush)", f"{calls['delete_s']} s"],
        ["sha256 of one 3 MB photo (in memory)", f"{calls['sha256_3mb_s'] * 1000:.2f} ms"],
        ["metadata scan per point / hashing a 3 MB photo", f"{calls['scan_per_point_vs_hash_3mb']}"],
    ], "every re-ingest hashes every file; the sync adds one metadata scan per stored point")
    C.table("Re-ingest of an unchanged folder (tiny-random model), medians of interleaved runs",
            ["images", "prune=False (s)", "prune=True (s)", "ratio"],
            [[overhead["images"], overhead["reingest_no_prune_s"], overhead["reingest_prune_s"],
              overhead["sync_overhead_ratio"]]], f"load avg {C.load_average():.2f}")
    return {**calls, **overhead}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--points", type=int, default=None)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    print(C.machine_line(), flush=True)
    run(a.quick, a.points, a.images, a.workdir)
