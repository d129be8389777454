"""EdgeStore on a real Qdrant Edge shard: spec record, queries, payload selection, locking, durability, threads."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest_store import (
    DIM,
    SPEC,
    TOKENS_LEN,
    check_filters,
    check_query_order_and_payload,
    check_scroll_update_delete,
    check_retrieve_existing_count_reupsert,
    check_spec_create_and_verify,
    check_threads,
    cosine_order,
    filled,
    make_points,
)
from qdrant_client import QdrantClient, models

from edje_qdrant.errors import InputError, StoreError, StoreLockedError
from edje_qdrant.store import ClientStore, EdgeStore
from edje_qdrant.store.edge import LOCK_NAME, SHARD_DIR, SPEC_FILE

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture
def store(tmp_path):
    s = EdgeStore(tmp_path / "store")
    yield s
    s.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())


# --------------------------------------------------------------------------- shared behaviour


def test_spec_create_and_verify(store):
    check_spec_create_and_verify(store)


def test_query_order_and_payload_selection(store):
    check_query_order_and_payload(store)


def test_retrieve_existing_count_and_reupsert(store):
    check_retrieve_existing_count_reupsert(store)


def test_scroll_update_payloads_delete(store):
    check_scroll_update_delete(store)


def test_eight_threads_match_sequential(store):
    check_threads(store)


def test_filters_match_their_meaning_and_local_mode(store):
    """Each filter selects what it means on Edge, and exactly the same points on qdrant-client :memory:."""
    edge = check_filters(store)
    local = ClientStore(QdrantClient(location=":memory:"))
    try:
        assert check_filters(local) == edge
    finally:
        local.close()


# --------------------------------------------------------------------------- Edge specifics


def test_layout_and_record_file(store, tmp_path):
    filled(store, points=make_points(3))
    cdir = tmp_path / "store" / "photos"
    record = json.loads((cdir / SPEC_FILE).read_text())
    assert record["spec"] == SPEC.to_dict() and record["vector"] == "clip" and record["distance"] == "cosine"
    assert (cdir / SHARD_DIR / "edge_config.json").exists()
    assert (tmp_path / "store" / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not [p for p in cdir.iterdir() if ".tmp" in p.name]


def test_damaged_record_is_a_clear_error(store, tmp_path):
    filled(store, points=make_points(2))
    (tmp_path / "store" / "photos" / SPEC_FILE).write_text("{not json")
    with pytest.raises(StoreError, match=r"edje-collection.json is damaged"):
        store.get_spec("photos")


def test_disk_usage_counts_the_token_payloads(store):
    filled(store, points=make_points(20))
    first = store.disk_usage("photos")
    assert first > 20 * TOKENS_LEN
    store.upsert("photos", make_points(20, seed=1, start=100))
    assert store.disk_usage("photos") > first + 10 * TOKENS_LEN
    with pytest.raises(StoreError, match="does not exist"):
        store.disk_usage("nope")


def test_unsupported_filter_parts_are_input_errors(store):
    filled(store, points=make_points(3))
    with pytest.raises(InputError, match="not supported by the embedded Qdrant Edge store"):
        store.query("photos", [1.0] * DIM, 3, None, filter=models.Filter.model_construct(must=[object()]))
    with pytest.raises(InputError, match="has no match, range"):
        store.query("photos", [1.0] * DIM, 3, None, filter=models.Filter(must=[models.FieldCondition(key="x")]))


def test_closed_store_refuses_and_releases_the_lock(tmp_path):
    s = EdgeStore(tmp_path / "s")
    filled(s, points=make_points(3))
    s.close()
    s.close()  # twice is fine
    with pytest.raises(StoreError, match="closed"):
        s.count("photos")
    with EdgeStore(tmp_path / "s") as again:  # the lock went with close()
        assert again.count("photos") == 3


def test_second_open_in_the_same_process_is_refused(store, tmp_path):
    with pytest.raises(StoreLockedError, match="already open by this process"):
        EdgeStore(tmp_path / "store")


def test_lock_refused_in_a_second_process(store, tmp_path):
    filled(store, points=make_points(2))
    code = (
        "import sys\n"
        "from edje_qdrant.store import EdgeStore\n"
        "from edje_qdrant.errors import StoreLockedError\n"
        "try:\n"
        "    EdgeStore(sys.argv[1])\n"
        "except StoreLockedError as e:\n"
        "    print('LOCKED', e)\n"
    )
    out = _python(code, str(tmp_path / "store"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("LOCKED"), out.stdout + out.stderr
    assert f"already open by process {os.getpid()}" in out.stdout and "--url" in out.stdout
    assert "panic" not in out.stderr.lower()


QUERY_CODE = (
    "import json, sys\n"
    "from edje_qdrant.store import EdgeStore\n"
    "s = EdgeStore(sys.argv[1])\n"
    "hits = s.query('photos', json.loads(sys.argv[2]), 5, ['page_content'])\n"
    "print(json.dumps({'count': s.count('photos'), 'hits': [[h.id, h.payload] for h in hits]}))\n"
    "s.close()\n"
)


def test_reopen_from_a_new_process_and_query(tmp_path):
    s = EdgeStore(tmp_path / "store")
    pts = filled(s)
    query = np.random.default_rng(11).normal(size=DIM).tolist()
    s.close()
    out = _python(QUERY_CODE, str(tmp_path / "store"), json.dumps(query))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    names = {p.id: p.payload["page_content"] for p in pts}
    assert got["count"] == len(pts)
    assert [h[0] for h in got["hits"]] == cosine_order(pts, query)[:5]
    assert [h[1] for h in got["hits"]] == [{"page_content": names[h[0]]} for h in got["hits"]]


WRITER_CODE = (
    "import sys, time\n"
    "from conftest_store import SPEC, make_points\n"
    "from edje_qdrant.store import EdgeStore\n"
    "s = EdgeStore(sys.argv[1])\n"
    "s.open_collection('photos', SPEC)\n"
    "batches = int(sys.argv[2])\n"
    "i = 0\n"
    "while batches < 0 or i < batches:\n"
    "    s.upsert('photos', make_points(5, seed=i, start=5 * i))\n"
    "    i += 1\n"
    "    print('ACK', 5 * i, flush=True)\n"
    "print('DONE', flush=True)\n"
    "time.sleep(120)\n"
)


def _read_until(proc: subprocess.Popen, stop: str) -> int:
    acked = 0
    for line in proc.stdout:
        if line.startswith("ACK"):
            acked = int(line.split()[1])
        if line.startswith(stop):
            return acked
    raise AssertionError(f"writer ended early: {proc.stderr.read()}")


def test_sigkill_after_upsert_loses_nothing(tmp_path):
    proc = _spawn(WRITER_CODE, str(tmp_path / "store"), "4")
    try:
        acked = _read_until(proc, "DONE")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert acked == 20
    with EdgeStore(tmp_path / "store") as s:  # the dead writer's lock is gone
        assert s.count("photos") == 20
        want = make_points(5, seed=3, start=15)[2]
        got = s.retrieve("photos", [want.id], None)
        assert got[0].payload == want.payload


def test_sigkill_in_the_middle_of_upserts_leaves_a_loadable_store(tmp_path):
    proc = _spawn(WRITER_CODE, str(tmp_path / "store"), "-1")
    try:
        seen = 0
        for line in proc.stdout:
            if line.startswith("ACK"):
                seen = int(line.split()[1])
                if seen >= 15:
                    break
        proc.send_signal(signal.SIGKILL)  # the writer is busy with its next batch
    finally:
        proc.kill()
        proc.wait(30)
    assert seen >= 15, proc.stderr.read()
    with EdgeStore(tmp_path / "store") as s:
        n = s.count("photos")
        assert n >= seen and n % 5 == 0  # every acknowledged batch, and no half batch
        assert s.get_spec("photos") == SPEC
        hits = s.query("photos", [1.0] * DIM, n, None)
        assert len(hits) == n
        assert all(len(h.payload["edje_tokens"]) == TOKENS_LEN for h in hits)
        s.upsert("photos", make_points(2, start=10_000))
        assert s.count("photos") == n + 2


def test_queries_run_while_another_thread_upserts(store):
    filled(store, points=make_points(10))
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                assert len(store.query("photos", [1.0] * DIM, 5, ["page_content"])) == 5
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    for k in range(5):
        store.upsert("photos", make_points(4, seed=50 + k, start=200 + 4 * k))
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert store.count("photos") == 30


def test_collection_opened_lazily_by_a_fresh_store(tmp_path):
    with EdgeStore(tmp_path / "s") as s:
        filled(s, points=make_points(4))
    with EdgeStore(tmp_path / "s") as s:  # no open_collection: query loads the recorded collection
        assert len(s.query("photos", [1.0] * DIM, 10, [])) == 4
        with pytest.raises(StoreError, match=r"'other' does not exist in store .*edje-qdrant ingest"):
            s.count("other")


def test_embedded_path_imports_neither_torch_nor_qdrant_client(tmp_path):
    code = (
        "import sys\n"
        "from edje_qdrant.store import CollectionSpec, PointRecord, open_store\n"
        "s = open_store(path=sys.argv[1])\n"
        "s.open_collection('photos', CollectionSpec(8, 'm', 'm/1', 'c'))\n"
        "ids = ['00000000-0000-0000-0000-00000000000%d' % i for i in (1, 2, 3)]\n"
        "meta = [{'folder': 'pets', 'taken_at': '2024-01-01T00:00:00'}, {'folder': 'pets'}, {'folder': 'x'}]\n"
        "s.upsert('photos', [PointRecord(i, [1.0] * 8, {'metadata': m}) for i, m in zip(ids, meta)])\n"
        "flt = {'folder': 'pets', 'taken_after': '2020-01-01'}\n"
        "hits = s.query('photos', [1.0] * 8, 5, ['page_content'], filter=flt)\n"
        "s.close()\n"
        "print(len(hits), 'torch' in sys.modules, 'qdrant_client' in sys.modules)\n"
    )
    out = _python(code, str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "False", "False"]


def test_a_store_dropped_without_close_gives_its_lock_back(tmp_path):
    s = EdgeStore(tmp_path / "s")
    filled(s, points=make_points(2))
    del s  # no close(): the shard and the lock go with the object
    with EdgeStore(tmp_path / "s") as again:
        assert again.count("photos") == 2


def test_optimize_keeps_the_data_and_the_order(store):
    pts = filled(store, points=make_points(12))
    query = [0.5] * DIM
    before = [h.id for h in store.query("photos", query, 12, [])]
    assert isinstance(store.optimize("photos"), bool)
    assert [h.id for h in store.query("photos", query, 12, [])] == before == cosine_order(pts, query)
    assert store.count("photos") == 12


def test_a_create_cut_short_is_finished_on_the_next_open(tmp_path):
    cdir = tmp_path / "s" / "photos"
    with EdgeStore(tmp_path / "s") as s:
        s.open_collection("photos", SPEC)
    shutil.rmtree(cdir / SHARD_DIR)
    (cdir / SHARD_DIR / "segments").mkdir(parents=True)  # as if the process died inside EdgeShard.create
    with EdgeStore(tmp_path / "s") as s:
        s.open_collection("photos", SPEC, create=False)
        s.upsert("photos", make_points(2))
        assert s.count("photos") == 2
