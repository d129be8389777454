"""Colour features per DINOv2 patch: a soft histogram over 11 named colours and the mean RGB of each 14x14 patch.

DINOv2 is trained with colour-jitter augmentation, so its tokens say little about colour, while captions name
colours all the time ("a man in a red shirt"). These 14 numbers per patch travel with the patch tokens into the
reranker's adapter (pooled over the same grid cells), giving the joint layer colour evidence to match words to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edje_qdrant.models import dinov2

# name -> RGB in [0, 1]; the 11 basic colour terms
PALETTE = {
    "black": (0.05, 0.05, 0.05), "white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5), "red": (0.8, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.05), "yellow": (0.95, 0.9, 0.15), "green": (0.15, 0.55, 0.15),
    "blue": (0.1, 0.3, 0.8), "purple": (0.5, 0.15, 0.6), "pink": (1.0, 0.6, 0.75), "brown": (0.45, 0.28, 0.12),
}
WIDTH = len(PALETTE) + 3
TEMPERATURE = 0.02  # squared RGB distance scale of the soft assignment


def colour_patch_features(pixels: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised pixels [B, 3, 224, 224] -> float32 [B, 256, 14]: per patch, the mean soft assignment of
    its pixels to the 11 palette colours, then its mean RGB."""
    mean = torch.tensor(dinov2.IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(dinov2.IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    rgb = (pixels.float() * std + mean).clamp(0, 1)
    palette = torch.tensor(list(PALETTE.values()), device=pixels.device)  # [11, 3]
    dist = ((rgb.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # [B, 11, H, W]
    soft = F.softmax(-dist / TEMPERATURE, dim=1)
    p = dinov2.PATCH_SIZE
    feats = torch.cat([F.avg_pool2d(soft, p), F.avg_pool2d(rgb, p)], dim=1)  # [B, 14, 16, 16]
    return feats.flatten(2).transpose(1, 2).contiguous()
