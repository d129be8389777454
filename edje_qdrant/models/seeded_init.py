"""Seeded random weights, the same in every process: the ``tiny-random`` preset and small test towers use them."""
from __future__ import annotations

import torch
from torch import nn


def seeded_init_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Overwrite every parameter from a private generator: norms/scales ~ 1 + N(0, 0.02²), the rest N(0, std²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 1 and (leaf == "weight" or "lambda" in leaf):  # LayerNorm / layer-scale
                p.copy_(1.0 + 0.02 * noise)
            else:
                p.copy_(std * noise)
    return module
