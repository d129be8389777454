"""First-stage embeddings for reranker training: the trained first stage read back from its training folder,
captions embedded in batches, lazily or all at once (memoised next to the weights)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edje_qdrant.errors import ModelError
from edje_qdrant.train.common import autocast
from edje_qdrant.train.first_stage import CONFIG, WEIGHTS, FirstStage


def load_first_stage(out: str | Path) -> tuple[FirstStage, dict]:
    """The trained first stage written by ``train_first_stage`` into ``out``, and its config."""
    out = Path(out)
    cfg_path, w_path = out / CONFIG, out / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise ModelError(f"{out} holds no trained first stage ({WEIGHTS}); run train_first_stage "
                         "(`edje-qdrant train first`) with the same --out first")
    cfg = json.loads(cfg_path.read_text())
    model = FirstStage(cfg["clip_dim"], cfg["train_layers"])
    missing, unexpected = model.load_state_dict(load_file(str(w_path)), strict=False)
    if unexpected:
        raise ModelError(f"{w_path}: unexpected keys {unexpected}")
    model.eval()
    return model, cfg


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: list[str], device: torch.device, bf16: bool,
                 batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """First-stage embeddings [N, e] of ``texts`` by ``model.text`` (float32, on the CPU)."""
    model.to(device).eval()
    chunks = []
    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm  # cost: only runs that draw a bar load it
        starts = tqdm(starts, desc="first-stage text", unit="batch")
    with autocast(device, bf16):
        for i in starts:
            chunks.append(model.text.encode(texts[i:i + batch_size]).float().cpu())
    return torch.cat(chunks)


class LazyTextEmbeddings:
    """First-stage caption embeddings computed on first use and memoised (``emb[list_of_indices]``)."""

    def __init__(self, model: FirstStage, texts: list[str], device: torch.device, bf16: bool) -> None:
        self.model, self.texts, self.device, self.bf16 = model, texts, device, bf16
        self.memo: dict[int, torch.Tensor] = {}
        self.shape = (len(texts), model.text.clip_dim)

    def __getitem__(self, idx: list[int]) -> torch.Tensor:
        todo = sorted({int(i) for i in idx if int(i) not in self.memo})
        if todo:
            emb = encode_texts(self.model, [self.texts[i] for i in todo], self.device, self.bf16)
            self.memo.update(zip(todo, emb))
        return torch.stack([self.memo[int(i)] for i in idx])


def all_text_embeddings(model: FirstStage, texts: list[str], out: Path, device: torch.device, bf16: bool,
                        progress: bool) -> torch.Tensor:
    """First-stage embeddings of every caption, memoised in ``out`` next to the first-stage weights they
    come from (recomputed when those weights or the captions change)."""
    key = hashlib.sha256((out / WEIGHTS).read_bytes())
    key.update("\n".join(texts).encode())
    path = out / "first_stage_text.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as fh:
            same = (fh.metadata() or {}).get("key") == key.hexdigest()
        if same:
            return load_file(str(path))["emb"]
    emb = encode_texts(model, texts, device, bf16, progress=progress)
    save_file({"emb": emb.contiguous()}, str(path), metadata={"key": key.hexdigest()})
    return emb


class TextOnly(torch.nn.Module):
    """Wraps a text tower so ``encode_texts`` (which reads ``model.text``) can embed with it."""

    def __init__(self, text: torch.nn.Module) -> None:
        super().__init__()
        self.text = text
