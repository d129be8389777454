"""Soak test of clean exits: run `edje-qdrant ingest DIR --json` and `edje-qdrant search` as subprocesses N times
and count the runs that did not exit 0 (a crash at interpreter shutdown shows up as rc 134 / SIGABRT).

    python benchmarks/soak.py IMAGES_DIR [-n 100] [--model flickr8k-dinov2s-minilm6] [--workdir DIR] [--json]

Each round ingests IMAGES_DIR into a fresh store (every point is new, as in the reported crash), then searches it.
Prints one line per failure (command, exit code, stderr tail) and a summary; exits 1 when any run failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "flickr8k-dinov2s-minilm6"


def cli() -> list[str]:
    """The installed CLI, run with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "edje_qdrant.cli.main"]


def run_once(args: list[str], timeout_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cli() + args, capture_output=True, text=True, timeout=timeout_s)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = "timeout", (exc.stderr or b"").decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else ""
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), "stderr_tail": (err or "")[-400:]}


def soak(images: Path, rounds: int, model: str = DEFAULT_MODEL, workdir: str | None = None,
         query: str = "a dog running on the grass", timeout_s: float = 300.0,
         progress: bool = True) -> dict[str, Any]:
    """Run ``rounds`` rounds of ingest + search; returns counts and the failures."""
    base = Path(tempfile.mkdtemp(prefix="edje-soak-", dir=workdir))
    counts = {"ingest": 0, "search": 0}
    failures: list[dict[str, Any]] = []
    seconds: dict[str, list[float]] = {"ingest": [], "search": []}
    try:
        for i in range(rounds):
            store = base / f"store-{i}"
            steps = {
                "ingest": ["ingest", str(images), "--store", str(store), "--model", model, "--json"],
                "search": ["search", query, "--store", str(store), "-k", "3", "--json"],
            }
            for name, args in steps.items():
                out = run_once(args, timeout_s)
                counts[name] += 1
                seconds[name].append(out["seconds"])
                if out["rc"] != 0:
                    failures.append({"round": i, "command": name, **out})
                    if progress:
                        print(f"round {i} {name}: exit {out['rc']}: {out['stderr_tail'].strip()[-200:]}", flush=True)
            shutil.rmtree(store, ignore_errors=True)
            if progress and (i + 1) % 10 == 0:
                print(f"{i + 1}/{rounds} rounds, {len(failures)} non-zero exits so far", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: sorted(v)[len(v) // 2] if v else None for k, v in seconds.items()}
    return {"rounds": rounds, "runs": counts, "non_zero_exits": len(failures), "failures": failures,
            "median_seconds": med, "model": model, "images": str(images)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", type=Path, help="folder of images to ingest each round (e.g. 20 photos)")
    ap.add_argument("-n", "--rounds", type=int, default=100, help="rounds of ingest + search")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--workdir", default=None, help="where the temporary stores go (default: system tmp)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    if not args.images.is_dir():
        ap.error(f"{args.images} is not a folder of images")
    out = soak(args.images, args.rounds, args.model, args.workdir, progress=not args.json)
    if args.json:
        print(json.dumps(out))
    else:
        total = sum(out["runs"].values())
        print(f"{out['non_zero_exits']} of {total} runs exited non-zero ({out['rounds']} rounds of ingest + search, "
              f"model {out['model']}); median seconds {out['median_seconds']}")
    return 1 if out["non_zero_exits"] else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    sys.exit(main())
