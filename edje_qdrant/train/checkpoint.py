"""Training checkpoints: atomic ``torch.save`` of plain state dicts, read back with ``weights_only=True``."""
from __future__ import annotations

import ast
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edje_qdrant.errors import ModelError


def rng_state() -> dict[str, Any]:
    """Random generator states (torch, numpy, python) as tensors so ``weights_only`` loading accepts them."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(np.frombuffer(repr(random.getstate()).encode(), dtype=np.uint8).copy()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    py = ast.literal_eval(bytes(state["python"].numpy().tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(path: str | Path, *, model: dict[str, torch.Tensor], optimizer: dict[str, Any],
                    step: int, epoch: int, extra: dict[str, Any] | None = None) -> Path:
    """Write model/optimizer state, counters and RNG states to ``path`` atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model, "optimizer": optimizer, "step": int(step), "epoch": int(epoch),
                "rng": rng_state(), "extra": extra or {}}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; drop --resume to start a new run")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt files
        raise ModelError(f"checkpoint {path} cannot be read ({exc}); delete it or point --out elsewhere") from exc
