"""The CLI end to end on an embedded store: ingest, search, info, re-ingest, reopen in a new process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import msgpack
import pybase64
import pytest
from click.testing import CliRunner

from edje_qdrant.cli.main import main
from edje_qdrant.schema import TOKENS_KEY


def _cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, demo_folder):
    store = tmp_path_factory.mktemp("cli") / "store"
    res = _cli("ingest", str(demo_folder), "--store", str(store), "--model", "tiny-random", "--json")
    assert res.exit_code == 0, res.output
    return store, json.loads(res.output.strip().splitlines()[-1])


def test_ingest_json_summary(ingested):
    _, summary = ingested
    assert summary["ingested"] == 12 and summary["skipped_existing"] == 0 and summary["failed"] == 0


def test_second_ingest_adds_nothing(ingested, demo_folder):
    store, _ = ingested
    res = _cli("ingest", str(demo_folder), "--store", str(store), "--model", "tiny-random")
    assert res.exit_code == 0, res.output
    assert "ingested 0, skipped-existing 12, duplicates 0, failed 0, removed 0, moved 0 in " in res.output


def test_decode_threads_and_the_ray_only_options(tmp_path, demo_folder):
    """--decode-threads counts decode threads (here, or in each Ray worker); the Ray-only options need --ray; the
    old --workers, which meant decode threads here and Ray workers with --ray, is gone."""
    store = str(tmp_path / "store")
    res = _cli("ingest", str(demo_folder), "--store", store, "--model", "tiny-random", "--decode-threads", "1",
               "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["ingested"] == 12
    for option in ("--ray-workers", "--gpus-per-worker"):
        res = CliRunner().invoke(main, ["ingest", str(demo_folder), "--store", store, option, "2"])
        assert res.exit_code == 1 and f"{option} applies to Ray workers: add --ray" in res.output
    res = CliRunner().invoke(main, ["ingest", str(demo_folder), "--store", store, "--workers", "2"])
    assert res.exit_code == 2 and "No such option '--workers'" in res.output


def test_search_json_has_both_scores(ingested):
    store, _ = ingested
    res = _cli("search", "a dog", "--store", str(store), "--json", "-k", "4", "--rerank-k", "8")
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)
    assert len(hits) == 4
    for h in hits:
        assert {"id", "path", "score", "first_stage_score", "rerank_score"} <= h.keys()
        assert isinstance(h["rerank_score"], float) and isinstance(h["first_stage_score"], float)


def test_search_plain_lines_are_score_and_path(ingested):
    store, _ = ingested
    res = _cli("search", "a dog", "--store", str(store), "-k", "3", "--rerank-k", "0")
    lines = res.output.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        score, path = line.split("  ", 1)
        float(score)
        assert os.path.exists(path)


def test_info_json_and_blob_size(ingested):
    store, _ = ingested
    info = json.loads(_cli("info", "--store", str(store), "--json").output)
    assert info["collection"] == "images" and info["points"] == 12
    assert info["model"] == "tiny-random" and info["codec"] == "edje-tokens/v1/fp16/64x384"
    assert info["disk_bytes"] > 12 * 49_152
    from edje_qdrant.store import open_store

    s = open_store(path=str(store))
    try:
        hit = s.query("images", [1.0] + [0.0] * (info["dim"] - 1), 1, [TOKENS_KEY])[0]
    finally:
        s.close()
    record = msgpack.unpackb(pybase64.b64decode(hit.payload[TOKENS_KEY]))
    assert len(record["data"]) == 49_152  # fp16 64 x 384


def test_reopen_in_a_new_process_and_search(ingested):
    store, _ = ingested
    out = subprocess.run(
        [sys.executable, "-m", "edje_qdrant.cli.main", "search", "a red circle", "--store", str(store), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 10


def test_errors_are_one_line_without_traceback(tmp_path):
    res = CliRunner().invoke(main, ["search", "x", "--store", str(tmp_path / "empty")])
    assert res.exit_code == 1
    assert "does not exist" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["ingest", str(tmp_path / "missing"), "--store", str(tmp_path / "s"),
                                    "--model", "tiny-random"])
    assert res.exit_code == 1 and "missing" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["search", "x", "-k", "20", "--rerank-k", "10", "--store", str(tmp_path)])
    assert res.exit_code == 1 and "rerank_k" in res.output


def test_help_shows_env_vars():
    out = _cli("search", "--help").output
    for var in ("EDJE_STORE", "QDRANT_URL", "QDRANT_API_KEY", "EDJE_COLLECTION", "EDJE_MODEL", "EDJE_DEVICE"):
        assert var in out


def test_where_filter_html_and_grid(ingested, tmp_path):
    store, _ = ingested
    html, grid = tmp_path / "r.html", tmp_path / "r.png"
    res = _cli("search", "a red circle", "--store", str(store), "--json", "-k", "3", "--rerank-k", "10",
               "--where", "folder=circle", "--html", str(html), "--grid", str(grid))
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert len(hits) == 3 and all(h["metadata"]["folder"] == "circle" for h in hits)
    page = html.read_text()
    assert "a red circle" in page and all(os.path.basename(h["path"]) in page for h in hits)
    from PIL import Image

    with Image.open(grid) as im:
        assert im.width > 100 and im.height > 100


def test_where_rejects_unknown_keys_and_bad_syntax(ingested):
    store, _ = ingested
    res = CliRunner().invoke(main, ["search", "x", "--store", str(store), "--where", "colour=red"])
    assert res.exit_code == 1 and "colour" in res.output
    res = CliRunner().invoke(main, ["search", "x", "--store", str(store), "--where", "folder"])
    assert res.exit_code == 1 and "KEY=VALUE" in res.output


def test_convert_official_compat_weights_then_load_and_score(tmp_path):
    from conftest import SHARED
    from safetensors.torch import load_file

    from edje_qdrant.models import load_model

    compat = SHARED / "compat"
    if not (compat / "weights.safetensors").exists():
        pytest.skip(f"compat vectors not found at {compat}")
    res = CliRunner().invoke(main, ["convert", str(compat / "weights.safetensors"), str(tmp_path / "bad")])
    assert res.exit_code == 1 and "heads" in res.output and "Traceback" not in res.output
    res = _cli("convert", str(compat / "weights.safetensors"), str(tmp_path / "conv"), "--preset", "tiny-random",
               "--config", str(compat / "config.json"))
    assert res.exit_code == 0, res.output
    assert not any(k.startswith(("vision_encoder.", "clip.")) for k in load_file(tmp_path / "conv" / "weights.safetensors"))
    model = load_model(str(tmp_path / "conv"), device="cpu")
    inputs = load_file(compat / "inputs.safetensors")["vision_encoder_output_tokens"]
    expected = load_file(compat / "expected.safetensors")
    cases = json.loads((compat / "cases.json").read_text())
    tokens = model.reranker.compress(inputs).detach()
    logits = model.rerank([c["caption"] for c in cases], tokens[[c["vision_index"] for c in cases]])
    assert abs(logits - expected["logits"].numpy()).max() < 1e-5


@pytest.mark.parametrize("stage, setting, expected", [
    ("edje", "bogus=1", "unknown reranker training options ['bogus']"),
    ("edje", "lr=fast", "lr='fast': expected float"),
    ("edje", "mining=sideways", "mining must be one of"),
    ("edje", "novalue", "--set expects KEY=VALUE"),
    ("edje", "steps=5", "--set steps: use its own option"),
    ("first", "lr=0.1", "No such option '--set'"),
    ("split", "bogus=1", "unknown split reranker options ['bogus']"),
    ("split", "candidates=1", "candidates must be >= 2"),
    ("split", "views=[\"sideways\"]", "views must be a non-empty subset of orig/flip"),
])
def test_train_set_rejects_bad_options_before_any_work(tmp_path, stage, setting, expected):
    tsv = tmp_path / "captions.tsv"
    tsv.write_text("image\tcaption_idx\tsplit\tcaption\na.jpg\t0\ttrain\ta dog\n")
    (tmp_path / "images").mkdir()
    r = _cli("train", stage, "--captions", str(tsv), "--images", str(tmp_path / "images"), "--out",
             str(tmp_path / "out"), "--set", setting)
    assert r.exit_code != 0
    assert expected in r.output
    assert not (tmp_path / "out").exists()
