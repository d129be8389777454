"""Crash and resume through the real CLI in a subprocess (SIGKILL at three points, SIGINT), store locking, and
server faults (timeouts, a dropped batch, an outage mid-ingest).

Kill points are chosen without any hook in the library: the folder holds "marker" files (text named .jpg)
at known places in walk order. The pipeline reports decode failures in walk order, after every batch before
the marker was upserted, so the N-th line in the errors file says how far the run got. Slow (large, highly
compressible) PNGs after a marker keep the run busy decoding when the signal lands.

Layout (batch size 4, walk order):
  00-m1.jpg            marker 1  -> run 1: SIGKILL while the next 4 slow PNGs decode (nothing upserted yet)
  01-s*.png  x4 slow, 02-g*.jpg x4   (2 batches)
  03-m2.jpg            marker 2  -> run 2: SIGKILL between upserts (2nd batch stored, 3rd not)
  04-g*.jpg  x8                       (2 batches)
  05-m3.jpg            marker 3  -> run 3: SIGINT (Ctrl-C): exit 130, one-line summary, no traceback
  06-s*.png  x4 slow, 07-g*.jpg x2   (1 batch + a partial one)
  08-m4.jpg            marker 4  -> run 4: SIGKILL during the final flush (the partial batch)
Run 5 completes. After every run the store is opened in this process and checked: it opens, the model record
is intact, every point is one of the expected images, stored exactly once.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import imagegen as g
from edje_qdrant.errors import StoreLockedError
from edje_qdrant.schema import point_id
from edje_qdrant.store import EdgeStore

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CLI = [sys.executable, "-m", "edje_qdrant.cli.main"]
RUN_TIMEOUT = 300  # seconds; a hung run fails the test instead of hanging it


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    signalled: bool  # the signal was sent while the process was still running


def run_cli(tmp: Path, tag: str, args: list[str], *, errors: Path | None = None, lines: int = 0,
            sig: int | None = None, when=None) -> Run:
    """Run the CLI; with ``sig``, send it once ``errors`` has ``lines`` lines (or ``when(proc)`` is true)."""
    out, err = tmp / f"{tag}.out", tmp / f"{tag}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([*CLI, *args], stdout=fo, stderr=fe, env=_env())
        signalled = False
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while sig is not None and proc.poll() is None and time.monotonic() < deadline:
                if (when(proc) if when else _lines(errors) >= lines):
                    proc.send_signal(sig)
                    signalled = True
                    break
                time.sleep(0.005)
            proc.wait(max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Run(proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"), signalled)


# --------------------------------------------------------------------------- the folder


def build_folder(root: Path) -> dict[str, str]:
    """Write the layout above; returns {point id: file name} of the images that must end up stored."""
    files: list[Path] = []
    root.mkdir(parents=True)
    for m in ("00-m1.jpg", "03-m2.jpg", "05-m3.jpg", "08-m4.jpg"):  # distinct bytes: not deduplicated
        (root / m).write_text(f"marker {m}: a text file named like an image\n")
    for i in range(4):  # distinct sizes: distinct bytes, distinct points
        files.append(g.make_slow_png(root / f"01-s{i}.png", size=(3000, 3000 + i)))
        files.append(g.make_image(root / f"02-g{i}.jpg", "JPEG", size=(32, 32), seed=10 + i))
        files.append(g.make_slow_png(root / f"06-s{i}.png", size=(3000, 3010 + i)))
    for i in range(8):
        files.append(g.make_image(root / f"04-g{i}.jpg", "JPEG", size=(32, 32), seed=20 + i))
    for i in range(2):
        files.append(g.make_image(root / f"07-g{i}.jpg", "JPEG", size=(32, 32), seed=30 + i))
    return {point_id(hashlib.sha256(p.read_bytes()).hexdigest()): p.name for p in files}


def check_store(store_path: Path, expected: dict[str, str]) -> dict[str, int]:
    """Open the store (must work right after a kill), check every point; returns stored/expected/duplicates."""
    with EdgeStore(store_path) as s:
        spec = s.get_spec("images")
        assert spec is not None and spec.model == "tiny-random"
        count = s.count("images")
        hits = s.query("images", [1.0] * spec.dim, count + 10, ["metadata"]) if count else []
        ids = [h.id for h in hits]
        shas = [h.payload["metadata"]["sha256"] for h in hits]
        names = [Path(h.payload["metadata"]["source"]).name for h in hits]
        found = s.retrieve("images", list(expected), [])
    assert len(hits) == count and set(ids) <= set(expected), "a point that is not one of the images"
    assert all(expected[i] == n for i, n in zip(ids, names)), "a point names another file than its content"
    assert len(found) == count  # every stored point is found by its content id
    duplicates = (len(ids) - len(set(ids))) + (len(shas) - len(set(shas))) + (len(names) - len(set(names)))
    return {"stored": count, "expected": len(expected), "duplicates": duplicates}


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_kill_and_resume_through_the_cli(tmp_path, record_property):
    root, store = tmp_path / "imgs", tmp_path / "store"
    expected = build_folder(root)
    assert len(expected) == 22
    base = ["ingest", str(root), "--store", str(store), "--model", "tiny-random", "--batch-size", "4",
            "--decode-threads", "2", "--json"]
    counts: dict[str, dict[str, int]] = {}
    last = 0

    def step(tag: str, lines: int, sig: int) -> Run:
        nonlocal last
        errors = tmp_path / f"errors-{tag}.jsonl"  # one file per run: the poller never sees an older run's
        run = run_cli(tmp_path, tag, [*base, "--errors-file", str(errors)], errors=errors, lines=lines, sig=sig)
        assert run.signalled, f"{tag}: the run ended before the signal: rc={run.rc} {run.stderr[-2000:]}"
        counts[tag] = c = check_store(store, expected)
        assert c["duplicates"] == 0 and c["stored"] >= last  # nothing lost, nothing twice
        last = c["stored"]
        return run

    r1 = step("sigkill-during-decode", 1, signal.SIGKILL)
    assert r1.rc == -signal.SIGKILL and counts["sigkill-during-decode"]["stored"] < 8

    r2 = step("sigkill-between-upserts", 2, signal.SIGKILL)
    assert r2.rc == -signal.SIGKILL
    assert counts["sigkill-between-upserts"]["stored"] >= 8  # both batches before marker 2 were acknowledged

    r3 = step("sigint", 3, signal.SIGINT)
    assert r3.rc == 130, r3.stderr
    assert "Traceback" not in r3.stderr and r3.stdout == ""
    summary = r3.stderr.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("interrupted (ingested "), r3.stderr  # one line, no log noise
    assert "run the same command again to resume" in summary[0]
    assert f"skipped-existing {counts['sigkill-between-upserts']['stored']}," in summary[0]
    assert counts["sigint"]["stored"] >= 16  # everything before marker 3 is stored
    got = int(summary[0].split("ingested ", 1)[1].split(",")[0])
    assert got == counts["sigint"]["stored"] - counts["sigkill-between-upserts"]["stored"]

    r4 = step("sigkill-final-flush", 4, signal.SIGKILL)
    assert r4.rc == -signal.SIGKILL
    assert counts["sigkill-final-flush"]["stored"] >= 20  # all but the last partial batch

    done = run_cli(tmp_path, "complete", [*base, "--errors-file", str(tmp_path / "errors-complete.jsonl")])
    assert done.rc == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["skipped_existing"] == last and report["ingested"] == 22 - last
    assert report["failed"] == 4 and report["duplicates"] == 0 and not report["interrupted"]
    counts["complete"] = final = check_store(store, expected)
    assert final == {"stored": 22, "expected": 22, "duplicates": 0}
    record_property("kill_resume_counts", json.dumps(counts))
    print("kill-and-resume counts:", json.dumps(counts))


def _loaded(proc: subprocess.Popen, lib: str = "libtorch") -> bool:
    try:
        return lib in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps (Linux)")
def test_ctrl_c_while_the_model_loads_exits_cleanly(tmp_path):
    root = tmp_path / "imgs"
    g.make_image(root / "a.jpg", "JPEG", size=(32, 32))
    store = tmp_path / "store"
    # Signal once torch's shared library is mapped: the command is inside the model loading.
    run = run_cli(tmp_path, "early", ["ingest", str(root), "--store", str(store), "--model", "tiny-random", "--json"],
                  sig=signal.SIGINT, when=_loaded)
    assert run.signalled and run.rc == 130, run.stderr
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("interrupted"), run.stderr


def test_second_process_on_a_locked_store_gets_a_clear_error(tmp_path):
    """The embedded store allows one process: another CLI process is told to wait or to use a server."""
    store = tmp_path / "store"
    with EdgeStore(store) as held:
        with pytest.raises(StoreLockedError):
            EdgeStore(store)
        run = run_cli(tmp_path, "locked", ["info", "--store", str(store), "--json"])
        assert held.path == store
    assert run.rc == 1, run.stderr
    msg = run.stderr.strip()
    assert msg.startswith("Error: store") and len(msg.splitlines()) == 1, msg
    assert f"already open by process {os.getpid()}" in msg and "--url" in msg and "QDRANT_URL" in msg
    assert "panic" not in msg.lower() and "Traceback" not in msg and run.stdout == ""


# --------------------------------------------------------------------------- server faults
# A real Qdrant server is needed for the retry-on-upsert cases (QDRANT_URL; skipped otherwise). The timeout case
# needs none: a listening socket that never answers is a server that times out.


@pytest.fixture
def blackhole():
    """A TCP port that accepts connections (kernel backlog) and never answers a byte."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("grpc", [pytest.param(True, marks=pytest.mark.slow), False], ids=["grpc", "rest"])
def test_server_timeouts_are_retried_with_backoff_then_a_clear_error(blackhole, grpc, caplog):
    import logging
    import warnings

    from qdrant_client import QdrantClient

    from edje_qdrant.errors import StoreError
    from edje_qdrant.store import ClientStore
    from edje_qdrant.store.base import CollectionSpec

    url = f"http://127.0.0.1:{blackhole}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = QdrantClient(url=url, grpc_port=blackhole, prefer_grpc=grpc, timeout=1, api_key="tmo-key-0577",
                              check_compatibility=False)
        store = ClientStore(client, url=url, retries=3, backoff_s=0.2)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="edje_qdrant"), pytest.raises(StoreError) as err:
            store.open_collection("photos", CollectionSpec(8, "m", "m/1", "c"))
        elapsed = time.monotonic() - t0
        store.close()
    msg = str(err.value)
    assert f"127.0.0.1:{blackhole} is unreachable" in msg and "failed 3 times" in msg and "QDRANT_URL" in msg
    assert "tmo-key-0577" not in msg and "tmo-key-0577" not in caplog.text
    delays = [r.getMessage().rsplit(" in ", 1)[1] for r in caplog.records if "retry" in r.getMessage()]
    assert delays == ["0.20s", "0.40s"]  # exponential backoff between the 3 attempts
    assert 0.6 <= elapsed < 60  # 3 timed-out attempts + 0.6 s of backoff, then it gives up


class FlakyUpserts:
    """A real QdrantClient whose upsert fails once, transiently, on the ``fail_on``-th call (a dropped batch)."""

    def __init__(self, client, fail_on: int) -> None:
        self._client_obj, self.fail_on, self.calls = client, fail_on, 0

    def __getattr__(self, name):
        return getattr(self._client_obj, name)

    def upsert(self, *args, **kwargs):
        from qdrant_client.http.exceptions import ResponseHandlingException

        self.calls += 1
        if self.calls == self.fail_on:
            raise ResponseHandlingException(ConnectionError("connection reset by peer (injected)"))
        return self._client_obj.upsert(*args, **kwargs)


@pytest.fixture
def server_client():
    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip("needs a real Qdrant server: set QDRANT_URL (and QDRANT_API_KEY if it has one)")
    from qdrant_client import QdrantClient

    client = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"), prefer_grpc=True)
    name = f"edjefault-{os.getpid()}-{int(time.time())}"
    yield client, url, name
    if client.collection_exists(name):
        client.delete_collection(name)
    client.close()


@pytest.mark.server
def test_partial_batch_failure_during_ingest_is_retried_and_nothing_is_lost(server_client, tmp_path, tiny_model,
                                                                             caplog):
    import logging

    from edje_qdrant.ingestion import ingest
    from edje_qdrant.store import ClientStore

    client, url, name = server_client
    root = tmp_path / "imgs"
    files = [g.make_image(root / f"{i:02d}.jpg", "JPEG", size=(32, 32), seed=400 + i) for i in range(10)]
    flaky = FlakyUpserts(client, fail_on=3)  # batches 1-2 stored, the 3rd dropped once, then retried
    store = ClientStore(flaky, url=url, batch_size=2, backoff_s=0.05)
    with caplog.at_level(logging.WARNING, logger="edje_qdrant"):
        report = ingest(root, store, tiny_model, name, batch_size=4)
    assert report.ingested == 10 and report.failed == 0
    assert any("retry 1/" in r.getMessage() for r in caplog.records)
    expected = {point_id(hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}
    assert store.count(name) == 10 and store.existing_ids(name, expected) == expected


@pytest.mark.server
def test_a_server_that_stays_down_mid_ingest_stops_with_a_clear_error_and_resumes(server_client, tmp_path,
                                                                                 tiny_model):
    from edje_qdrant.errors import StoreError
    from edje_qdrant.ingestion import ingest
    from edje_qdrant.store import ClientStore

    client, url, name = server_client
    root = tmp_path / "imgs"
    for i in range(12):
        g.make_image(root / f"{i:02d}.jpg", "JPEG", size=(32, 32), seed=500 + i)

    class Down(FlakyUpserts):
        def upsert(self, *args, **kwargs):
            self.calls += 1
            if self.calls >= self.fail_on:
                from qdrant_client.http.exceptions import ResponseHandlingException

                raise ResponseHandlingException(ConnectionError("connection refused (injected)"))
            return self._client_obj.upsert(*args, **kwargs)

    with pytest.raises(StoreError, match="unreachable"):
        ingest(root, ClientStore(Down(client, fail_on=3), url=url, retries=2, backoff_s=0.01), tiny_model, name,
               batch_size=4)
    store = ClientStore(client, url=url)
    stored = store.count(name)
    assert stored == 8  # the two batches acknowledged before the outage
    again = ingest(root, store, tiny_model, name, batch_size=4)
    assert again.skipped_existing == 8 and again.ingested == 4 and store.count(name) == 12
