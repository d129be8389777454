"""A plain-torch BERT encoder for query time: same state-dict keys and numbers as ``transformers.BertModel``.

Why: importing transformers' modeling code costs ~3 s on a small CPU (it pulls in torch.distributed and more);
a search needs only the MiniLM forward. This module imports torch alone, reads the weights with safetensors and
builds the modules without random initialisation. Training keeps using transformers (``minilm.load_bert``).
Only what MiniLM inference needs: absolute positions, token type 0, post-LayerNorm layers, exact GELU, padding
mask; dropout runs in train mode like BERT's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from edje_qdrant.errors import ModelError
from edje_qdrant.models import uninitialised


@dataclass
class LiteBertConfig:
    """The BertConfig fields the encoder uses (read from a Hugging Face ``config.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_json(cls, path: Path) -> "LiteBertConfig":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable BERT config ({exc})") from exc
        act = raw.get("hidden_act", "gelu")
        if act != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError(f"{path}: only absolute positions and exact gelu are supported, got {act!r}")
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class _Embeddings(nn.Module):
    def __init__(self, c: LiteBertConfig) -> None:
        super().__init__()
        self.word_embeddings = uninitialised.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = uninitialised.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = uninitialised.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = uninitialised.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class _SelfProjections(nn.Module):  # keys: attention.self.{query,key,value}
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value = uninitialised.Linear(d, d), uninitialised.Linear(d, d), uninitialised.Linear(d, d)


class _DenseNorm(nn.Module):  # keys: *.dense, *.LayerNorm
    def __init__(self, d_in: int, d: int, eps: float, p: float) -> None:
        super().__init__()
        self.dense = uninitialised.Linear(d_in, d)
        self.LayerNorm = uninitialised.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, c: LiteBertConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.p = c.attention_probs_dropout_prob
        self.self = _SelfProjections(c.hidden_size)
        self.output = _DenseNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps, c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, length, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, d // self.heads).transpose(1, 2)

        s = self.self
        ctx = F.scaled_dot_product_attention(split(s.query(x)), split(s.key(x)), split(s.value(x)), attn_mask=keep,
                                             dropout_p=self.p if self.training else 0.0)
        return self.output(ctx.transpose(1, 2).reshape(b, length, d), x)


class _Intermediate(nn.Module):
    def __init__(self, c: LiteBertConfig) -> None:
        super().__init__()
        self.dense = uninitialised.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: LiteBertConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps, c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, keep)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, c: LiteBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class _Pooler(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.dense = uninitialised.Linear(d, d)


@dataclass
class LiteBertOutput:
    last_hidden_state: torch.Tensor


class LiteBert(nn.Module):
    """BERT encoder with ``transformers.BertModel``'s parameter names; ``bert(input_ids=, attention_mask=)``
    returns an object with ``last_hidden_state``, as BertModel does."""

    def __init__(self, config: LiteBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = _Pooler(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> LiteBertOutput:
        x = self.embeddings(input_ids)
        keep = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return LiteBertOutput(x)


def load_lite_bert(directory: Path, num_layers: int | None = None) -> LiteBert:
    """``config.json`` + ``model.safetensors`` of a BERT folder -> LiteBert (first ``num_layers`` layers), eval mode.

    Modules are built without random initialisation and take the file's tensors as they are (no copy).
    """
    config = LiteBertConfig.from_json(directory / "config.json")
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    model = LiteBert(config)
    weights = directory / "model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise ModelError(f"{weights}: not a readable safetensors file ({exc})") from exc
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ModelError(f"{weights}: lacks BERT weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict({k: tensors[k].float() for k in want}, assign=True)
    return model.eval()
