"""Security: no pickle on any load path, API keys never printed or logged, the HTTP service's safe defaults.

(The official-checkpoint loader's refusal of a malicious pickle is in test_official_loader; here are the other
load paths and a scan of the whole package for unsafe loaders.)
"""
from __future__ import annotations

import ast
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edje_qdrant.errors import ModelError

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "edje_qdrant"
SOURCES = sorted([*PACKAGE.rglob("*.py"), *(REPO / "cli").rglob("*.py")])


class Evil:
    """Unpickling this runs os.mkdir(marker): proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def evil_files(tmp_path: Path) -> tuple[Path, list[bytes]]:
    marker = tmp_path / "pwned"
    return marker, [pickle.dumps({"model": {"w": Evil(marker)}}), _torch_saved(tmp_path, Evil(marker))]


def _torch_saved(tmp_path: Path, obj: object) -> bytes:
    path = tmp_path / "evil-torch.pt"
    torch.save({"model": obj, "step": 1}, path)
    return path.read_bytes()


# --------------------------------------------------------------------------- no pickle on any load path


def test_model_directory_weights_that_are_a_pickle_are_refused(tmp_path):
    from edje_qdrant.models import load_model

    marker, payloads = evil_files(tmp_path)
    for i, data in enumerate(payloads):
        d = tmp_path / f"model{i}"
        d.mkdir()
        (d / "config.json").write_text('{"preset": "tiny-random"}')
        (d / "weights.safetensors").write_bytes(data)  # a pickle disguised under our weights name
        with pytest.raises(ModelError, match="not a readable safetensors file"):
            load_model(str(d), device="cpu")
    assert not marker.exists()


def test_training_checkpoint_with_a_malicious_pickle_is_refused(tmp_path):
    from edje_qdrant.train.checkpoint import load_checkpoint

    marker, payloads = evil_files(tmp_path)
    for i, data in enumerate(payloads):
        path = tmp_path / f"ckpt{i}.pt"
        path.write_bytes(data)
        with pytest.raises(ModelError, match="cannot be read"):
            load_checkpoint(path)
    assert not marker.exists()


def test_official_loader_refuses_a_pickle_under_every_suffix(tmp_path):
    from edje_qdrant.models.official import read_state_dict

    marker, payloads = evil_files(tmp_path)
    for suffix in (".pth", ".pt", ".bin", ".ckpt", ".safetensors"):
        for i, data in enumerate(payloads):
            path = tmp_path / f"w{i}{suffix}"
            path.write_bytes(data)
            with pytest.raises(ModelError, match="weights_only|safetensors"):
                read_state_dict(path)
    assert not marker.exists()


def _call_name(node: ast.Call) -> str:
    parts = []
    f = node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_no_unsafe_loader_anywhere_in_the_package():
    """pickle/dill/joblib/marshal never imported; torch.load always weights_only=True; np.load never allow_pickle."""
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                for n in names:
                    if n and n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve",
                                                 "cloudpickle", "_pickle"}:
                        problems.append(f"{where}:{node.lineno} imports {n}")
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            if name.endswith("torch.load") or (name == "load" and isinstance(node.func, ast.Name)):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}:{node.lineno} {name}() without weights_only=True")
            if name.split(".")[-1] == "load" and name.split(".")[0] in {"np", "numpy"}:
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(f"{where}:{node.lineno} {name}(allow_pickle=...)")
            bare = isinstance(node.func, ast.Name)  # eval(...), not module.eval()
            if name.endswith(("yaml.load", "yaml.unsafe_load")) or (bare and name in {"eval", "exec"}):
                problems.append(f"{where}:{node.lineno} calls {name}")
    assert not problems, "\n".join(problems)
    assert any("torch.load" in p.read_text() for p in SOURCES)  # the scan does see the torch.load calls


# --------------------------------------------------------------------------- API keys


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the client retries with backoff (about 8 s) before giving up
def test_cli_never_prints_or_logs_the_api_key(tmp_path):
    key, password = "qdrant-key-5772156649", "url-password-1414213562"
    port = _closed_port()
    env = dict(os.environ, QDRANT_API_KEY=key, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "edje_qdrant.cli.main", "-vv", "info", "--url",
         f"http://admin:{password}@127.0.0.1:{port}", "--json"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "unreachable" in text and f"127.0.0.1:{port}" in text  # a clear error naming the server ...
    assert key not in text and password not in text  # ... but never the secrets, even at debug level
    assert "DEBUG" in text or "WARNING" in text  # the logs were on


def test_help_never_shows_key_values(monkeypatch):
    from edje_qdrant.cli.main import main
    from edje_qdrant.cli.serve import serve

    monkeypatch.setenv("QDRANT_API_KEY", "qdrant-key-2236067977")
    monkeypatch.setenv("EDJE_SERVICE_API_KEY", "svc-key-1732050807")
    for cmd, args in ((main, ["search", "--help"]), (main, ["ingest", "--help"]), (main, ["info", "--help"]),
                      (serve, ["--help"])):
        res = CliRunner().invoke(cmd, args)
        assert res.exit_code == 0, res.output
        assert "QDRANT_API_KEY" in res.output  # the variable is named ...
        assert "qdrant-key-2236067977" not in res.output and "svc-key-1732050807" not in res.output  # ... not its value


def test_open_store_error_does_not_echo_the_key():
    from edje_qdrant.errors import StoreError
    from edje_qdrant.store import open_store

    with pytest.raises(StoreError) as err:
        open_store(url="http://user:pw-secret-99@[::1", api_key="key-secret-98")  # unparsable URL
    assert "pw-secret-99" not in str(err.value) and "key-secret-98" not in str(err.value)


# --------------------------------------------------------------------------- the HTTP service's defaults


def test_service_binds_loopback_and_caps_requests_by_default():
    from edje_qdrant.cli.serve import DEFAULT_HOST, serve

    defaults = {p.name: p.default for p in serve.params}
    assert DEFAULT_HOST == "127.0.0.1" and defaults["host"] == "127.0.0.1"
    assert 0 < defaults["max_k"] <= 1000 and 0 < defaults["max_rerank_k"] <= 10_000
    assert 0 < defaults["max_body_bytes"] <= 1 << 20
    pytest.importorskip("fastapi", reason="optional extra: pip install 'edje-qdrant[service]'")
    from edje_qdrant.service import ServiceLimits

    limits = ServiceLimits()
    assert (limits.max_k, limits.max_rerank_k, limits.max_body_bytes, limits.max_upload_bytes) == (
        defaults["max_k"], defaults["max_rerank_k"], defaults["max_body_bytes"], defaults["max_upload_bytes"])
    assert 0 < defaults["max_upload_bytes"] <= 64 << 20
    assert 0 < limits.max_query_chars <= 10_000
