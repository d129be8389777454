"""Colour features per DINOv2 patch: a soft histogram over 11 named colours and the mean RGB of each 14x14 patch.

DINOv2 is trained with colour-jitter augmentation, so its tokens say little about colour, while captions name
colours all the time ("a man in a red shirt"). These 14 numbers per patch travel with the patch tokens into the
reranker's adapter (pooled over the same grid cells), giving the joint layer colour evidence to match words to.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# name -> RGB in [0, 1]; the 11 basic colour terms
PALETTE = {
    "black": (0.05, 0.05, 0.05), "white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5), "red": (0.8, 0.1, 0.1),
    "orange": (1.0, 0.55, 0.05), "yellow": (0.95, 0.9, 0.15), "green": (0.15, 0.55, 0.15),
    "blue": (0.1, 0.3, 0.8), "purple": (0.5, 0.15, 0.6), "pink": (1.0, 0.6, 0.75), "brown": (0.45, 0.28, 0.12),
}
WIDTH = len(PALETTE) + 3
TEMPERATURE = 0.02  # squared RGB distance scale of the soft assignment


def colour_patch_features(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], patch: int
                          ) -> torch.Tensor:
    """Pixels normalised by ``mean`` / ``std`` [B, 3, H, W] -> float32 [B, (H/patch)*(W/patch), 14]: per patch,
    the mean soft assignment of its pixels to the 11 palette colours, then its mean RGB (the vision tower says
    its normalisation and patch size: ``dinov2.colour_features``)."""
    mean = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    rgb = (pixels.float() * std + mean).clamp(0, 1)
    palette = torch.tensor(list(PALETTE.values()), device=pixels.device)  # [11, 3]
    dist = ((rgb.unsqueeze(1) - palette.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # [B, 11, H, W]
    soft = F.softmax(-dist / TEMPERATURE, dim=1)
    feats = torch.cat([F.avg_pool2d(soft, patch), F.avg_pool2d(rgb, patch)], dim=1)  # [B, 14, H/patch, W/patch]
    return feats.flatten(2).transpose(1, 2).contiguous()
