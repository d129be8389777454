"""TokenCompressionAdapter: shapes, official parameter names, and the exact computation."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from edje_qdrant.models.adapter import TokenCompressionAdapter

OFFICIAL_NAMES = {
    "query", "key.weight", "key.bias", "value.weight", "value.bias", "attention.in_proj_weight",
    "attention.in_proj_bias", "attention.out_proj.weight", "attention.out_proj.bias", "layernorm.weight",
    "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "projection.weight",
    "projection.bias",
}


def make(seed: int = 0, d: int = 16, heads: int = 4, m: int = 5, hidden: int = 24, out: int = 12):
    torch.manual_seed(seed)
    a = TokenCompressionAdapter(d, heads, m, hidden, out, layer_norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return a


def test_shapes_and_names():
    a = make()
    assert set(a.state_dict()) == OFFICIAL_NAMES
    assert a(torch.randn(3, 7, 16)).shape == (3, 5, 12)
    assert a(torch.randn(1, 1, 16)).shape == (1, 5, 12)
    assert a.state_dict()["query"].shape == (1, 5, 16)


def test_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\[B, n, 16\]"):
        make()(torch.randn(2, 7, 8))


def reference(a: TokenCompressionAdapter, x: torch.Tensor) -> torch.Tensor:
    """The official semantics written out by hand (two linear maps on k and v, scale 1/sqrt(D/heads))."""
    sd = {k: v.double() for k, v in a.state_dict().items()}
    x = x.double()
    d, h = x.shape[-1], a.attention.num_heads
    k = x @ sd["key.weight"].T + sd["key.bias"]
    v = x @ sd["value.weight"].T + sd["value.bias"]
    q = sd["query"].expand(x.shape[0], -1, -1)
    w, b = sd["attention.in_proj_weight"], sd["attention.in_proj_bias"]
    qp, kp, vp = (t @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i, t in enumerate((q, k, v)))

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

    att = torch.softmax(split(qp) @ split(kp).transpose(-1, -2) / math.sqrt(d // h), dim=-1) @ split(vp)
    att = att.transpose(1, 2).reshape(x.shape[0], -1, d)
    a_out = att @ sd["attention.out_proj.weight"].T + sd["attention.out_proj.bias"]
    ln = F.layer_norm(a_out, (d,), sd["layernorm.weight"], sd["layernorm.bias"], eps=1e-6)
    mlp = F.gelu(ln @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]) @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]
    return (a_out + mlp) @ sd["projection.weight"].T + sd["projection.bias"]


def test_matches_hand_written_reference():
    a = make(seed=3)
    x = torch.randn(4, 9, 16)
    with torch.no_grad():
        got = a(x)
    assert (got.double() - reference(a, x)).abs().max().item() < 1e-5


def test_rows_are_independent():
    a = make(seed=4)
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        together = a(x)
        alone = torch.cat([a(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)
