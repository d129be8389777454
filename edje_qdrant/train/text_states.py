"""Frozen lower-layer token states of the training captions, computed once and memoised on disk (training of
the split reranker and its validation)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edje_qdrant.models.split_joint import SplitJointReranker


class TextStates:
    """Frozen lower-layer token states of a list of texts, computed once (ragged, float16) and served as padded
    batches: ``batch(indices) -> (states [B, L, d], mask [B, L])``."""

    def __init__(self, model: SplitJointReranker, texts: list[str], batch_size: int = 256) -> None:
        flat, lengths = [], []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        rows: list[torch.Tensor | None] = [None] * len(texts)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                states, mask = model.encode_text([texts[i] for i in idx])
                for j, i in enumerate(idx):
                    rows[i] = states[j, : int(mask[j].sum())].to("cpu", torch.float16)
        for r in rows:
            flat.append(r)
            lengths.append(r.shape[0])
        self.lengths = torch.tensor(lengths)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        with torch.autocast("cpu", enabled=False):  # may be built under autocast; float16 rows concatenate as is
            self.flat = torch.cat(flat)

    def save(self, path: str | Path, key: str) -> None:
        save_file({"flat": self.flat.contiguous(), "lengths": self.lengths}, str(path), metadata={"key": key})

    @classmethod
    def load(cls, path: str | Path, key: str) -> "TextStates | None":
        """The states saved under ``key`` at ``path``, or None when absent or saved for other texts/weights."""
        path = Path(path)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
            self = cls.__new__(cls)
            self.flat, self.lengths = fh.get_tensor("flat"), fh.get_tensor("lengths")
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        return self

    def subset(self, rows: torch.Tensor | list[int]) -> "TextStates":
        """The states of some texts (row i of the result = row ``rows[i]`` here)."""
        idx = torch.as_tensor(rows, dtype=torch.long).flatten()
        out = TextStates.__new__(TextStates)
        out.flat = torch.cat([self.flat[int(self.offsets[i]):int(self.offsets[i + 1])] for i in idx.tolist()])
        out.lengths = self.lengths[idx].clone()
        out.offsets = torch.cat([torch.zeros(1, dtype=torch.long), out.lengths.cumsum(0)])
        return out

    def batch(self, indices: torch.Tensor | list[int], device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices).flatten()
        n, length = len(idx), int(self.lengths[idx].max())
        states = torch.zeros(n, length, self.flat.shape[1])
        mask = torch.zeros(n, length, dtype=torch.long)
        for r, i in enumerate(idx.tolist()):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            states[r, : b - a] = self.flat[a:b].float()
            mask[r, : b - a] = 1
        return states.to(device), mask.to(device)
