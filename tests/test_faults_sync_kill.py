"""SIGKILL during a sync through the real CLI, then a re-run: nothing still on disk is ever lost.

The store starts as an earlier ingest of the folder plus 20,000 points of files that have since been deleted
(written straight into the Edge store, so the sync has a long delete to do). Then photos are deleted,
changed, renamed and added, and `edje-qdrant ingest` runs in a subprocess:
  run 1  SIGKILL as soon as the first file failure is reported (a text file named .jpg, first in walk order):
         new points are being written;
  run 2  SIGKILL 0.2 s after the sync logs what it is about to do (-v): the stale points are being deleted;
  run 3  completes.
After each kill the store must open and hold, for every image on disk, its current content or (until the
run that replaces it completes) the content its path had before. After run 3 the collection equals the folder.
"""
from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import imagegen as g
from edje_qdrant.ingestion import ingest
from edje_qdrant.store import EdgeStore
from edje_qdrant.store.base import PointRecord
from test_faults_crash_resume import run_cli
from test_ingest_sync import pid_of

STALE = 20_000


def _stored(store_path: Path) -> dict[str, str]:
    """point id -> source of every point (the store must open right after a kill)."""
    with EdgeStore(store_path) as s:
        return {h.id: h.payload["metadata"]["source"] for h in s.scroll("images", ["metadata"])}


def _on_disk(root: Path) -> dict[str, str]:
    return {str(p): pid_of(p) for p in sorted(root.rglob("*.png"))}


def _check_nothing_lost(store_path: Path, root: Path, before: dict[str, str]) -> dict[str, str]:
    """Every picture stored before the run that is still on disk (same or another path) is stored; a changed
    file has its old or its new content stored. New files may still be missing (not ingested yet)."""
    stored = _stored(store_path)
    known = set(before.values())
    for path, pid in _on_disk(root).items():
        if pid in known:
            assert pid in stored, f"{path} (unchanged, moved or renamed) is on disk but no longer stored"
        elif path in before:
            assert pid in stored or before[path] in stored, f"{path} changed, and neither version is stored"
    return stored


@pytest.mark.slow
def test_sigkill_during_sync_loses_nothing_on_disk(tmp_path, tiny_model, record_property):
    root, store_path = tmp_path / "imgs", tmp_path / "store"
    files = [g.make_image(root / f"{i:02d}.png", "PNG", size=(32, 32), seed=700 + i) for i in range(12)]
    with EdgeStore(store_path) as s:
        assert ingest(root, s, tiny_model).ingested == 12
        rng = np.random.default_rng(0)
        gone = [PointRecord(str(uuid.uuid5(uuid.NAMESPACE_OID, f"gone-{i}")), rng.normal(size=tiny_model.clip_dim),
                            {"page_content": f"{i}.png", "metadata": {"source": str(root / "gone" / f"{i}.png"),
                                                                       "folder": "gone"}})
                for i in range(STALE)]
        s.upsert("images", gone)
    before = {str(p): pid_of(p) for p in files}

    files[0].unlink()
    files[1].unlink()
    g.make_image(files[2], "PNG", size=(32, 32), seed=900)  # changed
    g.make_image(files[3], "PNG", size=(32, 32), seed=901)
    files[4].rename(root / "renamed.png")
    (root / "sub").mkdir()
    files[5].rename(root / "sub" / "moved.png")
    g.make_image(root / "new.png", "PNG", size=(32, 32), seed=902)
    (root / "000-marker.jpg").write_text("a text file named like an image\n")

    errors = tmp_path / "errors.jsonl"
    base = ["ingest", str(root), "--store", str(store_path), "--model", "tiny-random", "--errors-file", str(errors),
            "--json"]
    r1 = run_cli(tmp_path, "kill-writing", base, errors=errors, lines=1, sig=signal.SIGKILL)
    assert r1.signalled and r1.rc == -signal.SIGKILL, r1.stderr[-2000:]
    after1 = _check_nothing_lost(store_path, root, before)

    err2, seen = tmp_path / "run2.err", []

    def deleting(proc) -> bool:  # 0.2 s after the sync said it starts: inside the ~0.5 s delete of 20,000 points
        if not seen and err2.exists() and "stale points" in err2.read_text(errors="replace"):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 0.2

    r2 = run_cli(tmp_path, "run2", ["-v", *base], sig=signal.SIGKILL, when=deleting)
    assert r2.signalled and r2.rc == -signal.SIGKILL, r2.stderr[-2000:]
    after2 = _check_nothing_lost(store_path, root, before)

    done = run_cli(tmp_path, "complete", base)
    assert done.rc == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    final = _stored(store_path)
    disk = _on_disk(root)
    assert sorted(final) == sorted(set(disk.values())) and sorted(final.values()) == sorted(disk)
    assert report["failed"] == 1 and report["prune_skipped"] is None
    left = lambda stored: sum(1 for src in stored.values() if "/gone/" in src)  # noqa: E731
    assert report["removed"] == left(after2) + sum(1 for p, pid in before.items() if pid in after2 and
                                                   pid not in final)
    counts = {"stale_after_kill_1": left(after1), "stale_after_kill_2": left(after2), "final_removed":
              report["removed"], "final_moved": report["moved"]}
    record_property("sync_kill_counts", json.dumps(counts))
    print("sync kill counts:", json.dumps(counts))
