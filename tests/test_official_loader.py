"""Official-format loading: file formats, SigLIP keys set aside, strict errors, tied copies, refusal of pickles."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from edje_qdrant.errors import CheckpointKeyError, ModelError
from edje_qdrant.models.official import (convert_official, load_official_reranker, read_state_dict,
                                         reranker_to_official_state)
from edje_qdrant.models.full_joint import FullJointReranker, FullJointConfig

CFG = {"vision": {"num_attention_heads": 2, "layer_norm_eps": 1e-6}, "bert": {"num_attention_heads": 4}}


def source_model(mlm: bool = False) -> FullJointReranker:
    torch.manual_seed(0)
    cfg = FullJointConfig(vision_width=16, vision_heads=2, num_tokens=4, adapter_hidden=32, hidden_size=32,
                          num_layers=2, num_heads=4, intermediate_size=64, mlm_head=mlm)
    model = FullJointReranker(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def src():
    return source_model()


@pytest.fixture()
def official(src):
    return reranker_to_official_state(src, text_projection_dim=24)


def logits(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 16, generator=g)
    with torch.inference_mode():
        return model.score(["a dog", "two cats on a sofa", ""], model.compress(x))


def same_weights(a: FullJointReranker, b: FullJointReranker) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("mlm."))


def test_bare_state_dict_round_trip(src, official):
    model, ckpt = load_official_reranker(official, CFG)
    assert same_weights(src, model)
    assert torch.equal(logits(src), logits(model))
    assert ckpt.skipped == ["text_projection.bias", "text_projection.weight"]


def test_training_checkpoint_pth_and_directory(tmp_path, src, official):
    path = tmp_path / "ckpt" / "checkpoint_best.pth"
    path.parent.mkdir()
    torch.save({"model": official, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, path)
    model, _ = load_official_reranker(path, CFG)
    assert same_weights(src, model)
    model2, _ = load_official_reranker(path.parent, CFG)  # directory holding one checkpoint
    assert same_weights(src, model2)


def test_safetensors_file_with_siglip_keys_set_aside(tmp_path, src, official):
    extra = {
        "vision_encoder.vision_model.post_layernorm.weight": torch.ones(16),  # transformers 4.x naming
        "vision_encoder.head.probe": torch.zeros(1, 1, 16),  # transformers 5.x naming
        "clip.logit_scale": torch.ones(1),
        "clip.text_model.head.weight": torch.zeros(8, 8),
    }
    path = tmp_path / "w.safetensors"
    save_file({**official, **extra}, str(path))
    model, ckpt = load_official_reranker(path, CFG)
    assert same_weights(src, model)
    assert set(ckpt.vision_encoder) == {"post_layernorm.weight", "head.probe"}
    assert set(ckpt.clip) == {"logit_scale", "text_model.head.weight"}


def test_ddp_prefix_is_removed(src, official):
    model, _ = load_official_reranker({"module." + k: v for k, v in official.items()}, CFG)
    assert same_weights(src, model)


def test_missing_unexpected_and_shape_errors_are_all_listed(official):
    bad = dict(official)
    del bad["classification_head.1.bias"]
    bad["language_model.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    bad["vision_projection.key.weight"] = torch.zeros(16, 8)
    with pytest.raises(CheckpointKeyError) as info:
        load_official_reranker(bad, CFG)
    msg = str(info.value)
    assert "missing keys" in msg and "head.1.bias" in msg
    assert "unexpected keys" in msg and "language_model.bert.pooler.dense.weight" in msg
    assert "shape mismatches" in msg and "vision_projection.key.weight: checkpoint [16, 8] vs model [16, 16]" in msg


def test_tied_copies_must_agree(official):
    bad = dict(official)
    bad["text_embeddings.weight"] = bad["text_embeddings.weight"] + 1
    with pytest.raises(CheckpointKeyError, match="tied copy text_embeddings.weight differs"):
        load_official_reranker(bad, CFG)
    only_copy = dict(official)  # canonical key absent, a tied copy present: used deliberately
    only_copy.pop("language_model.bert.embeddings.word_embeddings.weight")
    model, _ = load_official_reranker(only_copy, CFG)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, official["text_embeddings.weight"])


def test_mlm_head_loaded_and_tied_when_asked():
    src = source_model(mlm=True)
    off = reranker_to_official_state(src)
    assert torch.equal(off["language_model.cls.predictions.decoder.weight"], off["text_embeddings.weight"])
    model, _ = load_official_reranker(off, CFG, mlm_head=True)
    assert torch.equal(model.mlm.predictions.bias, src.mlm.predictions.bias)
    assert model.mlm.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.mlm.predictions.decoder.bias is model.mlm.predictions.bias
    plain, _ = load_official_reranker(off, CFG)  # MLM head present but not asked for: skipped
    assert plain.mlm is None


def test_heads_needed_when_shapes_cannot_tell(official):
    with pytest.raises(ModelError, match="attention heads"):
        load_official_reranker(official)


def test_mlp_projection_variant_is_refused(official):
    bad = {k: v for k, v in official.items() if not k.startswith("vision_projection.")}
    bad["vision_projection.0.weight"] = torch.zeros(64, 16)
    with pytest.raises(ModelError, match="MLP vision projection"):
        load_official_reranker(bad, CFG)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the protocol of the refused file
def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": {"x": Evil()}}, fh)
    with pytest.raises(ModelError, match="weights_only"):
        read_state_dict(path)
    zipped = tmp_path / "evil2.pth"
    torch.save({"model": Evil()}, zipped)
    with pytest.raises(ModelError, match="weights_only"):
        read_state_dict(zipped)
    assert not marker.exists()


def test_unknown_sources_name_what_was_looked_for(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"looked for \*\.safetensors"):
        read_state_dict(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown weight file type"):
        read_state_dict(tmp_path / "w.npz")


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="cannot reach the Hugging Face hub for 'someone/not-cached'"):
        read_state_dict("someone/not-cached")


def test_convert_writes_compact_fp16(tmp_path, src, official):
    out = convert_official(official_file(tmp_path, official), tmp_path / "conv", fp16=True, preset="tiny-random",
                           config=CFG)
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        assert all(fh.get_slice(k).get_dtype() == "F16" for k in keys)
    assert {k.split(".")[1] for k in keys} == {"adapter", "bert", "head"}
    assert {k.split(".", 1)[1] for k in keys} == set(src.state_dict()) and all(k.startswith("reranker.") for k in keys)


def official_file(tmp_path, official):
    path = tmp_path / "official.safetensors"
    save_file(official, str(path))
    return path
