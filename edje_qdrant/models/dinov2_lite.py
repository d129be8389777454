"""A plain-torch DINOv2 ViT for ingest and search: same state-dict keys and numbers as ``transformers.Dinov2Model``.

Why: importing transformers' modeling code and building a ``Dinov2Model`` (which first fills its 22 M weights at
random) took ~6 s on a small CPU before a search by image could run one forward. This module imports torch alone
and builds the layers without random initialisation; ``dinov2.load_lite_backbone`` then loads the weights. Its
state dict is key for key the one of ``Dinov2Model`` (so the model fingerprint does not change); training keeps
using transformers (``dinov2.load_backbone``). Only what DINOv2-S/14 inference needs: pre-norm layers with layer
scale, exact GELU MLP, no attention mask, position embeddings interpolated to the input size as transformers does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edje_qdrant.models import uninitialised


@dataclass(frozen=True)
class LiteDinov2Config:
    """The ``Dinov2Config`` fields the encoder uses (DINOv2-S/14 by default)."""

    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    mlp_ratio: int = 4
    patch_size: int = 14
    image_size: int = 518  # the native position grid: 37 x 37
    num_channels: int = 3
    layer_norm_eps: float = 1e-6


class LiteDinov2Output(NamedTuple):
    """What ``Dinov2Model`` returns that ingest and search read."""

    last_hidden_state: torch.Tensor  # [B, 1 + n, d], after the final LayerNorm
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings, then each layer's output (before the final norm)


class _PatchEmbeddings(nn.Module):
    def __init__(self, c: LiteDinov2Config) -> None:
        super().__init__()
        self.patch_size = c.patch_size
        self.projection = uninitialised.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(pixels.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)


class _Embeddings(nn.Module):
    def __init__(self, c: LiteDinov2Config) -> None:
        super().__init__()
        grid = c.image_size // c.patch_size
        self.cls_token = nn.Parameter(torch.empty(1, 1, c.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, c.hidden_size))  # unused at inference; zeros as transformers
        self.patch_embeddings = _PatchEmbeddings(c)
        self.position_embeddings = nn.Parameter(torch.empty(1, grid * grid + 1, c.hidden_size))

    def positions(self, patches: int, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of ``height`` x ``width`` pixels (bicubic, in float32)."""
        table = self.position_embeddings
        native = table.shape[1] - 1
        if patches == native and height == width:
            return table
        side = int(native ** 0.5)
        dim = table.shape[-1]
        p = self.patch_embeddings.patch_size
        grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.to(torch.float32), size=(height // p, width // p), mode="bicubic",
                             align_corners=False).to(table.dtype)
        return torch.cat((table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        x = self.patch_embeddings(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.positions(x.shape[1] - 1, height, width)


class _Attention(nn.Module):
    def __init__(self, c: LiteDinov2Config) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.q_proj = uninitialised.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = uninitialised.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = uninitialised.Linear(c.hidden_size, c.hidden_size)
        self.o_proj = uninitialised.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class _LayerScale(nn.Module):
    def __init__(self, c: LiteDinov2Config) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.empty(c.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class _MLP(nn.Module):
    def __init__(self, c: LiteDinov2Config) -> None:
        super().__init__()
        self.fc1 = uninitialised.Linear(c.hidden_size, c.hidden_size * c.mlp_ratio)
        self.fc2 = uninitialised.Linear(c.hidden_size * c.mlp_ratio, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, c: LiteDinov2Config) -> None:
        super().__init__()
        self.norm1 = uninitialised.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = _Attention(c)
        self.layer_scale1 = _LayerScale(c)
        self.norm2 = uninitialised.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _MLP(c)
        self.layer_scale2 = _LayerScale(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class _Encoder(nn.Module):
    def __init__(self, c: LiteDinov2Config) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class LiteDinov2(nn.Module):
    """DINOv2 backbone called like ``Dinov2Model``: ``model(pixel_values=x, output_hidden_states=...)``."""

    def __init__(self, config: LiteDinov2Config | None = None) -> None:
        super().__init__()
        self.config = config or LiteDinov2Config()
        self.embeddings = _Embeddings(self.config)
        self.encoder = _Encoder(self.config)
        self.layernorm = uninitialised.LayerNorm(self.config.hidden_size, eps=self.config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> LiteDinov2Output:
        x = self.embeddings(pixel_values)
        states = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x)
            if states is not None:
                states.append(x)
        return LiteDinov2Output(self.layernorm(x), tuple(states) if states is not None else None)
