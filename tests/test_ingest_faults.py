"""Ingest under faults: slow files, bombs, vanishing/unreadable files, odd names, links, Ctrl-C, SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import imagegen as g
from edje_qdrant.ingestion import ingest
from edje_qdrant.models.registry import load_model
from edje_qdrant.store import open_store

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random", device="cpu")


@pytest.fixture
def edge(tmp_path):
    s = open_store(path=str(tmp_path / "store"))
    yield s
    s.close()


class HookedStore:
    """The real store, with a test hook run after selected calls (to inject a real fault at a known point)."""

    def __init__(self, inner, after_upsert=None, before_existing=None):
        self._inner = inner
        self._after_upsert = after_upsert
        self._before_existing = before_existing
        self.upserts = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def existing_ids(self, name, ids):
        if self._before_existing:
            self._before_existing()
        return self._inner.existing_ids(name, ids)

    def upsert(self, name, points):
        self._inner.upsert(name, points)
        self.upserts += 1
        if self._after_upsert:
            self._after_upsert(self.upserts)


def read_errors(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_per_file_timeout_abandons_slow_file_and_run_goes_on(tmp_path, edge, model):
    root = tmp_path / "imgs"
    g.make_slow_png(root / "slow.png", size=(6000, 6000))
    for i in range(4):
        g.make_image(root / f"ok{i}.png", "PNG", seed=i)
    t0 = time.monotonic()
    report = ingest(root, edge, model, errors_file=tmp_path / "err.jsonl", file_timeout=0.1, workers=2)
    assert report.ingested == 4 and report.failed == 1
    (err,) = read_errors(tmp_path / "err.jsonl")
    assert err["path"].endswith("slow.png") and err["kind"] == "timeout" and "0.1 s" in err["reason"]
    assert time.monotonic() - t0 < 30
    again = ingest(root, edge, model, file_timeout=60)  # with time enough it goes in
    assert again.ingested == 1 and again.skipped_existing == 4


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_cap_in_ingest(tmp_path, edge, model):
    root = tmp_path / "imgs"
    g.make_png_header_bomb(root / "bomb.png", 12000, 12000)
    g.make_image(root / "big.png", "PNG", size=(64, 64), seed=1)
    g.make_image(root / "small.png", "PNG", size=(16, 16), seed=2)
    report = ingest(root, edge, model, errors_file=tmp_path / "e.jsonl", max_pixels=1000)
    assert report.ingested == 1 and report.failed == 2
    reasons = {Path(e["path"]).name: e for e in read_errors(tmp_path / "e.jsonl")}
    assert reasons["big.png"]["kind"] == "too_large" and "4,096" in reasons["big.png"]["reason"]
    assert "max_pixels" in reasons["big.png"]["reason"]
    assert reasons["bomb.png"]["kind"] == "too_large"


def test_file_deleted_between_listing_and_reading(tmp_path, edge, model):
    root = tmp_path / "imgs"
    for i in range(3):
        g.make_image(root / f"{i}.png", "PNG", seed=i)
    victim = root / "1.png"
    # Hashing has listed and read it; delete it just before it would be decoded.
    store = HookedStore(edge, before_existing=lambda: victim.exists() and victim.unlink())
    report = ingest(root, store, model, errors_file=tmp_path / "e.jsonl")
    assert report.ingested == 2 and report.failed == 1
    (err,) = read_errors(tmp_path / "e.jsonl")
    assert err["path"].endswith("1.png") and err["kind"] == "vanished"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read mode-000 files")
def test_unreadable_file_and_folder(tmp_path, edge, model):
    root = tmp_path / "imgs"
    locked = g.make_image(root / "locked.png", "PNG", seed=1)
    g.make_image(root / "closed" / "in.png", "PNG", seed=2)
    g.make_image(root / "ok.png", "PNG", seed=3)
    os.chmod(locked, 0)
    os.chmod(root / "closed", 0)
    try:
        report = ingest(root, edge, model, errors_file=tmp_path / "e.jsonl")
    finally:
        os.chmod(locked, 0o644)
        os.chmod(root / "closed", 0o755)
    assert report.ingested == 1 and report.failed == 2
    kinds = {Path(e["path"]).name: e["kind"] for e in read_errors(tmp_path / "e.jsonl")}
    assert kinds == {"locked.png": "unreadable", "closed": "walk"}


def test_links_loops_odd_names_and_image_named_folder(tmp_path, edge, model):
    root = tmp_path / "imgs"
    real = g.make_image(root / "real.png", "PNG", seed=1)
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    (root / "loop").mkdir()
    (root / "loop" / "back").symlink_to(root)
    (root / "link.png").symlink_to(real)  # same content: one point
    g.make_image(root / "album.jpg" / "inside.png", "PNG", seed=2)  # folder named like an image
    os.mkfifo(root / "pipe.jpg")
    odd = os.fsencode(root) + b"/na\xefve-\xff.png"
    g.make_image(Path(os.fsdecode(odd)), "PNG", seed=3)
    report = ingest(root, edge, model, errors_file=tmp_path / "e.jsonl")
    assert report.ingested == 3 and report.duplicates == 1 and report.failed == 2
    kinds = {Path(e["path"]).name: e for e in read_errors(tmp_path / "e.jsonl")}
    assert set(kinds) == {"dangling.jpg", "pipe.jpg"}
    sources = {h.payload["metadata"]["source"] for h in edge.query("images", [1.0] * model.clip_dim, 10, None)}
    assert str(root / "na\\xefve-\\xff.png") in sources  # display form of the undecodable name
    assert str(root / "album.jpg" / "inside.png") in sources


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_corrupt_exif_image_is_ingested_without_exif_fields(tmp_path, edge, model):
    root = tmp_path / "imgs"
    from PIL import Image

    src = g.pattern((40, 30), seed=4)
    root.mkdir()
    src.save(root / "c.jpg", "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\xff\xff\xff\xffgarbage")
    assert Image.open(root / "c.jpg").size == (40, 30)
    report = ingest(root, edge, model)
    assert report.ingested == 1
    (hit,) = edge.query("images", [1.0] * model.clip_dim, 1, None)
    meta = hit.payload["metadata"]
    assert (meta["width"], meta["height"]) == (40, 30) and "taken_at" not in meta and "geo" not in meta


def _ingest_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("edje-ingest")]


def test_ctrl_c_keeps_upserted_points_and_resume_completes(tmp_path, edge, model):
    root = tmp_path / "imgs"
    n = 24
    for i in range(n):
        g.make_image(root / f"{i:02d}.png", "PNG", size=(32, 32), seed=200 + i)

    def interrupt(calls: int) -> None:
        if calls == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered right after the 2nd upsert

    store = HookedStore(edge, after_upsert=interrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        ingest(root, store, model, batch_size=4)
    partial = info.value.ingest_report
    assert partial.interrupted
    stored = edge.count("images")
    assert stored == 8 and partial.ingested <= stored  # both finished batches are kept
    deadline = time.monotonic() + 5
    while _ingest_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _ingest_threads()  # workers and walker stopped

    report = ingest(root, edge, model, batch_size=4)
    assert report.skipped_existing == stored and report.ingested == n - stored
    assert edge.count("images") == n


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_without_duplicates_or_losses(tmp_path, model):
    root = tmp_path / "imgs"
    n = 20
    for i in range(n):
        g.make_image(root / f"{i:02d}.jpg", "JPEG", size=(32, 32), seed=300 + i)
    store_path = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_ingest_faults import HookedStore
        from edje_qdrant.ingestion import ingest
        from edje_qdrant.models.registry import load_model
        from edje_qdrant.store import open_store

        def kill(calls):
            if calls == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        store = HookedStore(open_store(path={str(store_path)!r}), after_upsert=kill)
        ingest({str(root)!r}, store, load_model("tiny-random", device="cpu"), batch_size=4)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    store = open_store(path=str(store_path))
    try:
        assert store.count("images") == 12
        report = ingest(root, store, model, batch_size=4)
        assert report.skipped_existing == 12 and report.ingested == n - 12
        assert store.count("images") == n
        hits = store.query("images", [1.0] * model.clip_dim, n + 5, None)
        assert sorted(h.payload["page_content"] for h in hits) == sorted(f"{i:02d}.jpg" for i in range(n))
    finally:
        store.close()
