"""``tiny-random`` preset: seeded random weights, CPU, no download, built in well under 2 s.

Real shapes where they matter to storage (64 x 384 compressed tokens, 49,152 bytes in fp16), tiny elsewhere:
a 2-layer DINOv2-style vision tower at 56 px (16 patches, width 64), a 2-layer BERT text tower (width 64, mean
pool + projection to 64), and a 2-layer joint encoder (hidden 384, 6 heads). Same seed -> same weights -> same
fingerprint in every process. For tests and demos; scores mean nothing.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model

from edje_qdrant.models.base import EdjeModel
from edje_qdrant.models.full_joint import FullJointConfig, FullJointReranker
from edje_qdrant.models.preset import Preset, PresetSpec, build_reranker
from edje_qdrant.models.seeded_init import seeded_init_
from edje_qdrant.models.tokenization import bert_text_tokenizer

NAME = "tiny-random"
IMAGE_SIZE = 56
PATCH = 14
VISION_WIDTH = 64
CLIP_DIM = 64
TEXT_WIDTH = 64
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def reranker_config() -> FullJointConfig:
    """Joint encoder sizes of the tiny preset (m = 64, d = 384)."""
    return FullJointConfig(vision_width=VISION_WIDTH, vision_heads=4, num_tokens=64, adapter_hidden=128,
                           hidden_size=384, num_layers=2, num_heads=6, intermediate_size=512)


class TinyVisionTower(nn.Module):
    """Random DINOv2-style ViT: global = L2-normalised projection of the pooled [CLS], patches = last hidden."""

    def __init__(self) -> None:
        super().__init__()
        cfg = Dinov2Config(hidden_size=VISION_WIDTH, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH, layer_norm_eps=1e-6)
        self.vit = Dinov2Model(cfg)
        self.proj = nn.Linear(VISION_WIDTH, CLIP_DIM)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        img = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return np.ascontiguousarray((arr - _MEAN) / _STD, dtype=np.float32)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vit(pixel_values=pixels.to(self.proj.weight.device))
        glob = F.normalize(self.proj(out.pooler_output).float(), dim=-1)
        return glob, out.last_hidden_state[:, 1:]


class TinyTextTower(nn.Module):
    """Random 2-layer BERT over the shared uncased vocab; masked mean pool + projection, L2-normalised."""

    def __init__(self) -> None:
        super().__init__()
        cfg = BertConfig(vocab_size=30522, hidden_size=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.proj = nn.Linear(TEXT_WIDTH, CLIP_DIM)
        self._tok = bert_text_tokenizer(max_length=64)

    def encode(self, texts: list[str]) -> torch.Tensor:
        encs = self._tok.encode_batch(list(texts))
        dev = self.proj.weight.device
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long, device=dev)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long, device=dev)
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        w = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        return F.normalize(self.proj(pooled).float(), dim=-1)


def build(spec: PresetSpec) -> EdjeModel:
    """Factory of ``tiny-random`` (option ``seed`` in a directory config, default 0)."""
    seed = int(spec.config.get("seed", 0))
    vision = seeded_init_(TinyVisionTower(), seed + 1).eval()
    text = seeded_init_(TinyTextTower(), seed + 2).eval()
    reranker = build_reranker(spec, lambda: seeded_init_(FullJointReranker(reranker_config()), seed + 3))
    return EdjeModel(name=NAME, vision=vision, text=text, reranker=reranker.eval(), clip_dim=CLIP_DIM,
                     fingerprint="", image_batch_size=16)


PRESET = Preset(NAME, build)
