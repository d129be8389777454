"""siglip2-l16-384-edje built offline from small random SigLIP configs; hub failures are clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edje_qdrant.errors import ModelError
from edje_qdrant.models import load_model
from edje_qdrant.models.official import reranker_to_official_state, save_compact
from edje_qdrant.models.full_joint import FullJointReranker, FullJointConfig

SIGLIP = {
    "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                    "vocab_size": 30522, "max_position_embeddings": 64, "projection_size": 32},
    "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                      "image_size": 32, "patch_size": 8},
}
NAME = "siglip2-l16-384-edje"


def small_reranker() -> FullJointReranker:
    torch.manual_seed(0)
    r = FullJointReranker(FullJointConfig(vision_width=32, vision_heads=2, num_tokens=4, adapter_hidden=64,
                                          hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64))
    with torch.no_grad():
        for p in r.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return r.eval()


def check_model(model, r: FullJointReranker):
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (20, 70), (0, 0, 255))]
    pixels = np.stack([model.vision.preprocess(im) for im in images])
    assert pixels.shape == (2, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    glob, tokens = model.embed_images(pixels)
    assert glob.shape == (2, 32) and np.allclose(np.linalg.norm(glob, axis=1), 1, atol=1e-5)
    assert tokens.shape == (2, 4, 32)
    q = model.embed_query("a red square")
    assert q.shape == (32,) and abs(np.linalg.norm(q) - 1) < 1e-5
    with torch.inference_mode():
        want = r.score("a red square", torch.from_numpy(tokens)).numpy()
    assert np.allclose(model.rerank("a red square", tokens), want, atol=1e-6)


def test_small_random_preset_from_directory(tmp_path):
    r = small_reranker()
    save_compact(r, tmp_path / "m", preset=NAME, extra={"siglip": SIGLIP, "text_tokenizer": "bert-uncased"})
    model = load_model(str(tmp_path / "m"), device="cpu")
    assert model.name == NAME and model.fingerprint.startswith(NAME + "-")
    check_model(model, r)
    again = load_model(str(tmp_path / "m"), device="cpu")
    assert again.fingerprint == model.fingerprint


def test_official_checkpoint_with_siglip_copies(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    r = small_reranker()
    torch.manual_seed(5)
    siglip = SiglipModel(SiglipConfig(**SIGLIP))
    state = reranker_to_official_state(r)
    state.update({f"clip.{k}": v for k, v in siglip.state_dict().items()})
    state.update({f"vision_encoder.vision_model.{k[len('vision_model.'):]}": v
                  for k, v in siglip.state_dict().items() if k.startswith("vision_model.")})
    torch.save({"model": state, "epoch": 0}, tmp_path / "ckpt.pth")
    d = tmp_path / "m"
    d.mkdir()
    cfg = {"preset": NAME, "siglip": SIGLIP, "checkpoint": str(tmp_path / "ckpt.pth")}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="attention heads"):  # sizes of this tiny checkpoint need a config
        load_model(str(d), device="cpu")
    cfg["official_config"] = {"vision": {"num_attention_heads": 2}, "bert": {"num_attention_heads": 4}}
    (d / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(d), device="cpu")
    assert model.vision.patch_model is None  # vision_encoder copy equals clip's vision model: one forward
    got = model.vision.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in siglip.vision_model.state_dict().items())
    assert torch.equal(model.text.model.head.weight, siglip.text_model.head.weight)
    check_model(model, r)


def test_hub_unreachable_names_what_was_looked_for(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="google/siglip2-large-patch16-384"):
        load_model(NAME, device="cpu")
