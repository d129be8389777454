"""CLI cold start: the real `edje-qdrant` command run as a subprocess (a fresh interpreter each time), wall
seconds end to end, p50 of N runs after one warm-up run (warm disk cache).

Rows: `--help`; errors that must come before any model loads (a typo'd -k, -k 0, a missing collection, a missing
store, a store locked by another process; ingest of a missing folder, of an empty one, into a locked store); a
first search by text and one by image with the default preset on a store of ~30 photos ingested here (Flickr8k
photos from ../shared when present, else generated images; copied to a temporary folder).

    python benchmarks/bench_cli.py [--quick] [--images DIR] [--reps 5]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "images"
TARGETS = {"help": 0.5, "error": 1.0, "search": 3.0}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edje_qdrant.cli.main", *args]


def timed(args: list[str], expect_rc: int) -> float:
    """Wall seconds of one CLI run; raises when it exits with another code than ``expect_rc``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cli(*args), capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != expect_rc:
        raise RuntimeError(f"`edje-qdrant {' '.join(args)}` exited {proc.returncode}, expected {expect_rc}: "
                           f"{proc.stderr[-500:]}")
    return took


def p50(args: list[str], expect_rc: int, reps: int) -> tuple[float, list[float]]:
    timed(args, expect_rc)  # warm-up: disk cache, fingerprint cache
    times = [timed(args, expect_rc) for _ in range(reps)]
    return statistics.median(times), times


def photos(dest: Path, count: int, source: Path | None) -> Path:
    """``count`` images in ``dest``: copies from ``source`` (or the shared Flickr8k folder), else generated."""
    dest.mkdir(parents=True, exist_ok=True)
    src = source or (SHARED_IMAGES if SHARED_IMAGES.is_dir() else None)
    if src is not None:
        for f in sorted(p for p in src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]:
            shutil.copy(f, dest / f.name)
        return dest
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 255, 3)
        img = np.clip(base + rng.normal(0, 40, (240, 320, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(dest / f"gen_{i:03d}.jpg", quality=90)
    return dest


def run(quick: bool = False, images: Path | None = None, reps: int = 5, workdir: str | None = None) -> dict[str, Any]:
    reps = 3 if quick else reps
    tmp = Path(tempfile.mkdtemp(prefix="edje-bench-cli-", dir=workdir))
    try:
        folder = photos(tmp / "photos", 10 if quick else 30, images)
        store = str(tmp / "store")
        empty = tmp / "empty"
        empty.mkdir()
        t0 = time.perf_counter()
        subprocess.run(cli("ingest", str(folder), "--store", store, "--json"), check=True, capture_output=True)
        ingest_s = time.perf_counter() - t0
        query = ["search", "a dog running on the grass", "--store", store]
        cases = [
            ("--help", ["--help"], 0, "help"),
            ("search --help", ["search", "--help"], 0, "help"),
            ("search -k abc (typo'd argument)", query + ["-k", "abc"], 2, "error"),
            ("search -k 0 (bad value)", query + ["-k", "0"], 1, "error"),
            ("search, missing collection", query + ["--collection", "nope"], 1, "error"),
            ("search, missing store", ["search", "a dog", "--store", str(tmp / "no-store")], 1, "error"),
            ("info, missing store", ["info", "--store", str(tmp / "no-store")], 1, "error"),
            ("ingest, missing folder", ["ingest", str(tmp / "no-folder"), "--store", str(tmp / "s2")], 1, "error"),
            ("ingest, empty folder", ["ingest", str(empty), "--store", str(tmp / "s3")], 0, "error"),
        ]
        rows, out = [], {"ingest_s": round(ingest_s, 2), "reps": reps}
        for name, args, rc, kind in cases:
            med, times = p50(args, rc, reps)
            rows.append([name, round(med, 3), round(max(times), 3), f"<= {TARGETS[kind]}", _met(med, kind)])
            out[f"{kind}:{name}"] = round(med, 3)
        from edje_qdrant.store import EdgeStore

        holder = EdgeStore(store)  # another process holds the store: the CLI must say so at once
        try:
            for name, args in (("search, store locked by another process", query),
                               ("ingest, store locked by another process", ["ingest", str(folder), "--store", store])):
                med, times = p50(args, 1, reps)
                rows.append([name, round(med, 3), round(max(times), 3), f"<= {TARGETS['error']}", _met(med, "error")])
                out[f"error:{name}"] = round(med, 3)
        finally:
            holder.close()
        photo = sorted(folder.iterdir())[0]
        for name, args, key in (("first search (default preset, rerank_k 100)", query + ["-k", "5"], "search_s_p50"),
                                ("search --image (default preset)", ["search", "--image", str(photo), "--store", store,
                                                                     "-k", "5"], "search_image_s_p50")):
            med, times = p50(args, 0, reps)
            rows.append([name, round(med, 3), round(max(times), 3), f"<= {TARGETS['search']}", _met(med, "search")])
            out[key] = round(med, 3)
        out["help_s_p50"] = max(v for k, v in out.items() if k.startswith("help:"))
        out["error_s_p50_worst"] = max(v for k, v in out.items() if k.startswith("error:"))
        C.table("CLI cold start: a fresh `edje-qdrant` process each run (s, wall)",
                ["command", "p50", "max", "target", "met"], rows,
                f"p50 of {reps} after one warm-up; store of {len(list(folder.iterdir()))} photos ingested here in "
                f"{ingest_s:.1f} s; {C.machine_line()}")
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _met(value: float, kind: str) -> str:
    return "yes" if value <= TARGETS[kind] else "NO"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=Path, default=None, help="folder of photos to ingest (default: shared Flickr8k)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    print(C.machine_line())
    run(a.quick, a.images, a.reps, a.workdir)
