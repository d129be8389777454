"""Shared training helpers: device and precision choice, seeding, cosine schedule, dev recall metrics."""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
from pathlib import Path

import numpy as np
import torch

from edje_qdrant.metrics import recalls
from edje_qdrant.models import dinov2
from edje_qdrant.models.device import resolve_device, resolve_precision


def pick_device(device: str | None = None) -> torch.device:
    """Explicit device, else cuda when available, else cpu (``models/device.py``)."""
    return resolve_device(device)


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether ``precision`` ("auto" | "bf16" | "fp32") resolves to bf16 on ``device`` (``models/device.py``)."""
    return resolve_precision(precision, device) == "bf16"


def seed_everything(seed: int) -> None:
    """Seed torch, random and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warm-up then cosine decay to 0.05."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac))


def default_cache_folder(images_dir: str | Path) -> Path:
    """Token cache folder for an images directory, under the user cache folder (never inside the repo)."""
    key = hashlib.sha1(str(Path(images_dir).resolve()).encode()).hexdigest()[:12]
    return dinov2.cache_dir() / "token-cache" / key


def recall_at_k(sim: torch.Tensor, caption_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
                ) -> dict[str, float]:
    """Recall@K (percent) both ways from a caption x image similarity [C, I] and each caption's image index."""
    order = sim.argsort(dim=1, descending=True)
    rank_t2i = (order == caption_image.view(-1, 1)).float().argmax(1)
    order_i = sim.t().argsort(dim=1, descending=True)  # [I, C]
    hit = caption_image[order_i] == torch.arange(sim.shape[1]).view(-1, 1)  # [I, C]
    rank_i2t = hit.float().argmax(1)
    return recalls(rank_t2i.numpy(), ks, "t2i_") | recalls(rank_i2t.numpy(), ks, "i2t_")
