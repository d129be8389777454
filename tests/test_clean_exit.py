"""Issue 12 (A): commands exit 0 every time. No worker thread of ours is alive when the interpreter shuts down
(a daemon thread killed inside native code can abort the process after all the work was done), and a few rounds
of the soak script (benchmarks/soak.py: ingest + search as subprocesses) all exit 0."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from edje_qdrant.ingestion.pool import TaskPool

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_shutdown_waits_for_every_worker():
    pool = TaskPool(3, name="t-exit")
    tasks = [pool.submit(time.sleep, 0.05) for _ in range(6)]
    for t in tasks:
        pool.wait(t, 5.0)
    pool.shutdown()
    assert pool.alive_workers() == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("t-exit")]


def test_an_idle_worker_holds_no_reference_to_its_last_task():
    """The crash of issue 12: a daemon worker held its last task (args: the model) while idle; at interpreter
    shutdown it dropped that last reference and freed torch tensors in a dying thread -> SIGABRT."""
    import gc
    import weakref

    class Model:  # stands in for the EdjeModel passed to every decode task
        pass

    pool = TaskPool(2, name="t-refs")
    model = Model()
    tasks = [pool.submit(lambda m, i: i, model, i) for i in range(4)]
    assert [pool.wait(t, 5.0) for t in tasks] == [0, 1, 2, 3]
    ref = weakref.ref(model)
    del model, tasks
    gc.collect()
    assert ref() is None, "an idle worker still references a finished task's arguments"
    pool.shutdown()


def test_shutdown_cancels_queued_work_and_still_joins():
    pool = TaskPool(1, name="t-cancel")
    first = pool.submit(time.sleep, 0.2)
    queued = [pool.submit(time.sleep, 5) for _ in range(4)]
    time.sleep(0.05)
    t0 = time.monotonic()
    pool.shutdown()
    assert time.monotonic() - t0 < 2.0  # the running task finished; the queued ones never ran
    assert pool.alive_workers() == 0
    assert first.future.done() and all(q.future.cancelled() for q in queued)


def test_a_stuck_worker_does_not_hold_up_shutdown():
    release = threading.Event()
    pool = TaskPool(1, name="t-stuck")
    stuck = pool.submit(release.wait, 30)
    from edje_qdrant.ingestion import UnusableFile

    with pytest.raises(UnusableFile):
        pool.wait(stuck, 0.2)  # abandoned; a fresh worker takes its place
    t0 = time.monotonic()
    pool.shutdown(join_s=5.0)
    assert time.monotonic() - t0 < 1.0  # the replacement exits at once; the stuck one is not waited for
    assert pool.alive_workers() == 1
    release.set()
    for t in [t for t in threading.enumerate() if t.name.startswith("t-stuck")]:
        t.join(2.0)
    assert pool.alive_workers() == 0


def test_ingest_leaves_no_thread_behind(tmp_path, demo_folder, tiny_model):
    from edje_qdrant.ingestion import ingest
    from edje_qdrant.store import open_store

    before = {t.ident for t in threading.enumerate()}
    with open_store(path=str(tmp_path / "store")) as store:
        assert ingest(demo_folder, store, tiny_model, "images", workers=3).ingested == 12
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert left == []


def test_soak_rounds_all_exit_zero(demo_folder, tmp_path):
    """Two rounds of ingest + search in fresh processes (tiny model: quick); the 100-round run with the
    default preset is `python benchmarks/soak.py DIR -n 100` (see the README)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import soak
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = soak.soak(demo_folder, 2, model="tiny-random", workdir=str(tmp_path), progress=False)
    assert out["runs"] == {"ingest": 2, "search": 2}
    assert out["non_zero_exits"] == 0, out["failures"]
