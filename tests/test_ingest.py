"""End-to-end ingest on real stores (Qdrant Edge on disk, qdrant-client :memory:) with the tiny model."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import imagegen as g
from edje_qdrant.codec import decode_tokens
from edje_qdrant.schema import TOKENS_KEY
from edje_qdrant.errors import InputError, ModelMismatchError
from edje_qdrant.ingestion import IngestReport, ingest, point_id
from edje_qdrant.ingestion.decode import decode_image
from edje_qdrant.models.registry import load_model
from edje_qdrant.store import open_store


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random", device="cpu")


@pytest.fixture(params=["edge", "memory"])
def store(request, tmp_path):
    s = open_store(path=str(tmp_path / "store")) if request.param == "edge" else open_store(url=":memory:")
    yield s
    s.close()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return root, g.build_sample_folder(root)


def pid_of(path) -> str:
    return point_id(hashlib.sha256(path.read_bytes()).hexdigest())


def payload_of(store, path, collection="images"):
    (hit,) = store.retrieve(collection, [pid_of(path)], None)
    return hit.payload


def test_sample_folder_counts_payload_and_errors_file(sample, store, model, tmp_path):
    root, info = sample
    errors = tmp_path / "errors.jsonl"
    report = ingest(root, store, model, errors_file=errors)
    assert isinstance(report, IngestReport)
    assert report.ingested == len(info["good"]) and report.failed == len(info["bad"])
    assert report.skipped_existing == 0 and report.duplicates == 0 and not report.interrupted
    assert report.seconds > 0 and report.images_per_s > 0
    assert store.count("images") == len(info["good"])
    d = report.to_dict()
    assert d["ingested"] == report.ingested and d["errors_file"] == str(errors)

    lines = [json.loads(x) for x in errors.read_text().splitlines()]
    assert sorted(x["path"] for x in lines) == sorted(str(root / b) for b in info["bad"])
    assert all(x["reason"] and x["error_type"] and x["kind"] for x in lines)
    assert report.failures == lines  # the report keeps the same records (first 100)
    kinds = {x["path"].rsplit("/", 1)[1]: x["kind"] for x in lines}
    assert kinds == {"empty.jpg": "empty", "notes.png": "not_image", "truncated.png": "truncated",
                     "header.png": "not_image"}

    a = payload_of(store, root / "a.jpg")
    assert a["page_content"] == "a caption for a"  # sidecar caption
    meta = a["metadata"]
    assert meta["source"] == str(root / "a.jpg") and meta["folder"] == ""
    assert (meta["width"], meta["height"]) == (64, 48) and meta["mime"] == "image/jpeg"
    assert meta["size"] == (root / "a.jpg").stat().st_size
    assert meta["sha256"] == hashlib.sha256((root / "a.jpg").read_bytes()).hexdigest()
    assert meta["mtime"] == pytest.approx((root / "a.jpg").stat().st_mtime)
    assert meta["orientation"] == 1
    assert a["edje_model"] == model.fingerprint
    tokens = decode_tokens(a[TOKENS_KEY])
    assert tokens.shape == (model.num_tokens, model.token_dim)

    e = payload_of(store, root / "sub/deeper/e.bmp")
    assert e["page_content"] == "e.bmp" and e["metadata"]["folder"] == "sub/deeper"
    if "sub/k.heic" in info["good"]:
        assert payload_of(store, root / "sub/k.heic")["metadata"]["mime"] in ("image/heic", "image/heif")


def test_vector_and_tokens_are_the_models_output(tmp_path, store, model):
    p = g.make_image(tmp_path / "imgs" / "one.png", "PNG", seed=11)
    g.make_image(tmp_path / "imgs" / "two.png", "PNG", seed=12)
    ingest(tmp_path / "imgs", store, model, dtype="fp16")
    pixels = model.vision.preprocess(decode_image(p.read_bytes()).image)
    vec, tok = model.embed_images(pixels[None])
    top = store.query("images", vec[0].tolist(), 1, [TOKENS_KEY])[0]
    assert top.id == pid_of(p) and top.score == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(decode_tokens(top.payload[TOKENS_KEY]), tok[0], atol=2e-3, rtol=1e-2)


def test_reingest_adds_nothing_and_checks_store_before_decoding(sample, store, model):
    root, info = sample
    first = ingest(root, store, model)
    count = store.count("images")
    # max_pixels=1 would fail every image that gets decoded: a re-run must not decode stored ones.
    again = ingest(root, store, model, max_pixels=1)
    assert again.ingested == 0 and again.skipped_existing == first.ingested
    assert again.failed == len(info["bad"])
    assert store.count("images") == count


def test_changed_file_gets_new_point_old_one_kept_without_prune(tmp_path, store, model):
    root = tmp_path / "imgs"
    p = g.make_image(root / "photo.png", "PNG", seed=1)
    g.make_image(root / "other.png", "PNG", seed=2)
    ingest(root, store, model)
    old_id = pid_of(p)
    g.make_image(p, "PNG", seed=3)  # same path, new content
    report = ingest(root, store, model, prune=False)
    assert report.ingested == 1 and report.skipped_existing == 1 and report.removed == 0
    assert store.count("images") == 3  # without prune the old content's point stays (test_ingest_sync: with it)
    new = payload_of(store, p)
    assert new["metadata"]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert store.retrieve("images", [old_id], None)[0].payload["metadata"]["source"] == str(p)


def test_same_content_two_paths_is_one_point(tmp_path, store, model):
    root = tmp_path / "imgs"
    p = g.make_image(root / "a" / "x.png", "PNG", seed=5)
    (root / "b").mkdir()
    shutil.copy(p, root / "b" / "copy.png")
    report = ingest(root, store, model)
    assert report.ingested == 1 and report.duplicates == 1
    assert store.count("images") == 1
    assert payload_of(store, p)["metadata"]["source"] == str(p)  # first in walk order


def test_exif_orientation_and_fields_in_payload(tmp_path, store, model):
    root = tmp_path / "imgs"
    exif = g.make_exif(orientation=6, taken_at="2020:01:02 03:04:05", make="Nikon", model="Z6",
                       gps=(59.9139, 10.7522))
    p = g.make_image(root / "rot.jpg", "JPEG", size=(64, 32), exif=exif)
    ingest(root, store, model)
    meta = payload_of(store, p)["metadata"]
    assert (meta["width"], meta["height"]) == (32, 64) and meta["orientation"] == 6
    assert meta["taken_at"] == "2020-01-02T03:04:05"
    assert meta["camera_make"] == "Nikon" and meta["camera_model"] == "Z6"
    assert meta["geo"] == {"lat": pytest.approx(59.9139, abs=1e-4), "lon": pytest.approx(10.7522, abs=1e-4)}


def test_mismatched_model_refused_before_writing(tmp_path, store, model):
    root = tmp_path / "imgs"
    g.make_image(root / "a.png", "PNG")
    ingest(root, store, model, dtype="fp16")
    g.make_image(root / "b.png", "PNG", seed=9)
    with pytest.raises(ModelMismatchError):
        ingest(root, store, model, dtype="int8")  # another codec for the same collection
    assert store.count("images") == 1


def test_bad_folder_and_options(tmp_path, model):
    s = open_store(url=":memory:")
    with pytest.raises(InputError, match="does not exist"):
        ingest(tmp_path / "nope", s, model)
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="not a directory") as info:
        ingest(f, s, model)
    assert "file.jpg" in str(info.value)
    with pytest.raises(InputError, match="workers"):
        ingest(tmp_path, s, model, workers=0)
    with pytest.raises(InputError, match="batch_size"):
        ingest(tmp_path, s, model, batch_size=-1)
    with pytest.raises(InputError, match="dtype"):
        ingest(tmp_path, s, model, dtype="fp8")
    with pytest.raises(InputError, match="errors file"):
        ingest(tmp_path, s, model, errors_file=f / "errors.jsonl")  # parent is a file
    assert s.get_spec("images") is None  # nothing was created


def test_batches_workers_progress_and_int8(tmp_path, store, model, capsys):
    root = tmp_path / "imgs"
    for i in range(13):
        g.make_image(root / f"d{i % 3}" / f"{i:02d}.jpg", "JPEG", seed=100 + i)
    report = ingest(root, store, model, "int8col", dtype="int8", batch_size=4, workers=1, progress=True)
    assert report.ingested == 13 and store.count("int8col") == 13
    err = capsys.readouterr().err
    assert "ingest" in err and "13/13" in err  # tqdm progress line on stderr, with the total from the walk
    spec = store.get_spec("int8col")
    assert spec.codec.startswith("edje-tokens/v1/int8/") and spec.fingerprint == model.fingerprint
    quiet = ingest(root, store, model, "int8col", dtype="int8")
    assert quiet.skipped_existing == 13
    assert capsys.readouterr().err == ""  # progress is off by default


def test_empty_folder(tmp_path, store, model):
    (tmp_path / "empty").mkdir()
    report = ingest(tmp_path / "empty", store, model)
    assert (report.ingested, report.failed, report.skipped_existing) == (0, 0, 0)
    assert report.prune_skipped == "no images found"
    assert store.get_spec("images") is None  # no collection is created for nothing
    report = ingest(tmp_path / "empty", str(tmp_path / "new-store"), "tiny-random")
    assert report.seen == 0 and not (tmp_path / "new-store").exists()  # nor a store


def test_ingest_is_the_function_whichever_import_comes_first():
    code = ("import edje_qdrant.ingestion.pipeline\nfrom edje_qdrant import ingest\n"
            "from edje_qdrant.ingestion import ingest as direct\n"
            "import edje_qdrant\nassert callable(ingest) and ingest is direct is edje_qdrant.ingest\n"
            "print('ok')")
    for program in (code, code.replace("import edje_qdrant.ingestion.pipeline\n", "", 1) + "\nimport "
                    "edje_qdrant.ingestion.walk\nfrom edje_qdrant import ingest as again\nassert again is direct"):
        out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_ingest_takes_the_store_and_model_forms_the_retriever_takes(tmp_path):
    from edje_qdrant import Retriever

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        g.make_image(folder / f"p{i}.png", seed=40 + i)
    store_dir = tmp_path / "store"
    report = ingest(folder, str(store_dir), "tiny-random")  # a store folder path and a preset name
    assert report.ingested == 3
    with Retriever(str(store_dir)) as r:  # the path form again: the store was closed by ingest
        assert len(r.search("anything", k=3, rerank_k=3)) == 3
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="does not exist"):
        ingest(missing, str(tmp_path / "store2"), "tiny-random")
    assert not (tmp_path / "store2").exists()  # the folder is checked before a store is created


def test_a_ctrl_c_during_a_batch_write_is_raised_after_the_batch_is_counted():
    import os
    import signal
    import time

    from edje_qdrant.ingestion.run import interrupt_after

    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt_after():
            os.kill(os.getpid(), signal.SIGINT)  # lands while the batch is being written
            time.sleep(0.05)
            steps.append("stored and counted")
    assert steps == ["stored and counted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back
