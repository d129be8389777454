"""Token-compression adapter: n vision tokens -> m learned-query tokens in the joint encoder's width.

Same computation and parameter names as the official ``TokenCompressionAdapter`` (checkpoint prefix
``vision_projection.`` maps to ``adapter.`` here): k = key(x), v = value(x); a = MultiheadAttention(query, k, v)
(which has its own q/k/v input projections); h = a + fc2(gelu(fc1(LayerNorm(a)))); out = projection(h).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AdapterMLP(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TokenCompressionAdapter(nn.Module):
    """Cross-attention of ``num_tokens`` learned queries over vision tokens ``[B, n, D]`` -> ``[B, m, H]``."""

    def __init__(self, vision_width: int, num_heads: int, num_tokens: int, mlp_hidden: int,
                 out_width: int, layer_norm_eps: float = 1e-6) -> None:
        super().__init__()
        if vision_width % num_heads:
            raise ValueError(f"vision width {vision_width} is not divisible by {num_heads} heads")
        self.num_tokens = num_tokens
        self.query = nn.Parameter(torch.randn(1, num_tokens, vision_width) * 0.02)
        self.key = nn.Linear(vision_width, vision_width)
        self.value = nn.Linear(vision_width, vision_width)
        self.attention = nn.MultiheadAttention(vision_width, num_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(vision_width, eps=layer_norm_eps)
        self.mlp = AdapterMLP(vision_width, mlp_hidden)
        self.projection = nn.Linear(vision_width, out_width)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        if vision_tokens.dim() != 3 or vision_tokens.shape[-1] != self.query.shape[-1]:
            raise ValueError(f"adapter expects vision tokens [B, n, {self.query.shape[-1]}], "
                             f"got {list(vision_tokens.shape)}")
        k = self.key(vision_tokens)
        v = self.value(vision_tokens)
        q = self.query.expand(vision_tokens.shape[0], -1, -1).to(k.dtype)
        a, _ = self.attention(q, k, v, need_weights=False)
        h = a + self.mlp(self.layernorm(a))
        return self.projection(h)
