"""Registry and tiny-random preset: names, errors, determinism, local model directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from edje_qdrant.errors import CheckpointKeyError, InputError, ModelError
from edje_qdrant.models import available_presets, load_model
from edje_qdrant.models.official import convert_official, reranker_to_official_state, save_compact

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu")


def test_presets_listed_and_unknown_name_names_them():
    assert "tiny-random" in available_presets()
    with pytest.raises(ModelError, match="tiny-random"):
        load_model("no-such-model", device="cpu")


def test_bad_device_and_precision(tmp_path):
    with pytest.raises(InputError, match="precision"):
        load_model("tiny-random", device="cpu", precision="fp8")
    with pytest.raises(InputError, match="device"):
        load_model("tiny-random", device="warp-drive")
    f = tmp_path / "model.pth"
    f.write_bytes(b"")
    with pytest.raises(ModelError, match="convert"):
        load_model(str(f), device="cpu")


def test_one_precision_rule_for_serving_and_training():
    from edje_qdrant.models.device import cpu_has_fast_bf16, resolve_precision
    from edje_qdrant.train.common import use_bf16

    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == "fp32"  # serving default on the CPU: exact scores
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    for precision in ("auto", "fp32", "bf16"):
        assert use_bf16(cpu, precision) == (resolve_precision(precision, cpu) == "bf16")
    assert load_model("tiny-random", device="cpu", precision="auto").precision == resolve_precision("auto", cpu)


def test_tiny_shapes_and_storage_size(tiny):
    assert (tiny.num_tokens, tiny.token_dim, tiny.clip_dim) == (64, 384, 64)
    assert tiny.fingerprint.startswith("tiny-random-") and len(tiny.fingerprint) == len("tiny-random-") + 12
    images = [Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (40, 40), (10, 220, 10))]
    pixels = np.stack([tiny.vision.preprocess(im) for im in images])
    assert pixels.dtype == np.float32 and pixels.shape == (2, 3, 56, 56)
    glob, tokens = tiny.embed_images(pixels)
    assert glob.shape == (2, 64) and np.allclose(np.linalg.norm(glob, axis=1), 1, atol=1e-5)
    assert tokens.shape == (2, 64, 384) and tokens[0].astype(np.float16).nbytes == 49_152
    q = tiny.embed_query("a red square")
    assert q.shape == (64,) and abs(np.linalg.norm(q) - 1) < 1e-5
    scores = tiny.rerank("a red square", tokens)
    assert scores.shape == (2,) and scores.dtype == np.float32 and scores[0] != scores[1]


def test_tiny_is_deterministic_in_process(tiny):
    again = load_model("tiny-random", device="cpu")
    assert again.fingerprint == tiny.fingerprint
    a, b = tiny.reranker.state_dict(), again.reranker.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_fingerprint_same_in_another_process(tiny):
    code = "from edje_qdrant.models import load_model; print(load_model('tiny-random', device='cpu').fingerprint)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == tiny.fingerprint


def test_directory_seed_option_changes_fingerprint(tmp_path, tiny):
    d = tmp_path / "seed1"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"preset": "tiny-random", "seed": 1}))
    other = load_model(str(d), device="cpu")
    assert other.name == "tiny-random" and other.fingerprint != tiny.fingerprint


def perturbed_reranker(tiny):
    import copy

    r = copy.deepcopy(tiny.reranker)
    with torch.no_grad():
        r.head[1].bias.add_(0.5)
        r.adapter.query.mul_(1.5)
    return r


def test_compact_directory_round_trip(tmp_path, tiny):
    r = perturbed_reranker(tiny)
    save_compact(r, tmp_path / "m", preset="tiny-random")
    loaded = load_model(str(tmp_path / "m"), device="cpu")
    sd, want = loaded.reranker.state_dict(), r.state_dict()
    assert set(sd) == set(want) and all(torch.equal(sd[k], want[k]) for k in sd)
    assert loaded.fingerprint != tiny.fingerprint
    tokens = torch.randn(3, 64, 384)
    with torch.inference_mode():
        assert torch.equal(loaded.reranker.score("q", tokens), r.score("q", tokens))


def test_directory_weight_errors(tmp_path, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(empty), device="cpu")
    (empty / "config.json").write_text(json.dumps({"preset": "nope"}))
    with pytest.raises(ModelError, match="unknown preset 'nope'"):
        load_model(str(empty), device="cpu")
    save_compact(tiny.reranker, tmp_path / "bad", preset="tiny-random", fp16=True)
    w = tmp_path / "bad" / "weights.safetensors"
    tensors = load_file(str(w))
    del tensors["reranker.head.1.bias"]
    tensors["reranker.head.2.weight"] = torch.zeros(1)
    save_file(tensors, str(w))
    with pytest.raises(CheckpointKeyError, match=r"missing \['head.1.bias'\], unexpected \['head.2.weight'\]"):
        load_model(str(tmp_path / "bad"), device="cpu")
    w.unlink()
    with pytest.raises(ModelError, match="weights.safetensors is missing"):
        load_model(str(tmp_path / "bad"), device="cpu")


def test_converted_official_checkpoint_loads_as_preset_directory(tmp_path, tiny):
    r = perturbed_reranker(tiny)
    src = tmp_path / "official.pth"
    torch.save({"model": reranker_to_official_state(r, text_projection_dim=64), "epoch": 1}, src)
    cfg = {"vision": {"num_attention_heads": 4}, "bert": {"num_attention_heads": 6}}
    out = convert_official(src, tmp_path / "converted", fp16=False, preset="tiny-random", config=cfg)
    loaded = load_model(str(out), device="cpu")
    tokens = torch.randn(2, 64, 384)
    with torch.inference_mode():
        assert torch.allclose(loaded.reranker.score(["a", "b"], tokens), r.score(["a", "b"], tokens), atol=1e-6)
    meta = json.loads((out / "config.json").read_text())
    assert meta["preset"] == "tiny-random" and meta["reranker"]["num_tokens"] == 64
