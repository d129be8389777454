"""A tower built on first use: text search never pays for loading the vision tower's weights."""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image


class DeferredTower:
    """Stands in for a tower: ``preprocess`` runs without weights; ``encode`` (or any other attribute) builds
    the real tower once with ``build()``, puts it on the device last given to ``to`` and in eval mode."""

    def __init__(self, build: Callable[[], Any], preprocess: Callable[[Image.Image], np.ndarray]) -> None:
        self._build = build
        self._preprocess = preprocess
        self._device = torch.device("cpu")
        self._tower: Any = None
        self._lock = threading.Lock()
        self._after: list[Callable[[Any], None]] = []

    @property
    def loaded(self) -> bool:
        """Whether the real tower has been built."""
        return self._tower is not None

    def after_build(self, fn: Callable[[Any], None]) -> None:
        """Run ``fn(tower)`` right after the tower is built (e.g. loading a model folder's weights into it)."""
        with self._lock:
            if self._tower is not None:
                fn(self._tower)
            else:
                self._after.append(fn)

    def tower(self) -> Any:
        """The real tower (built on the first call)."""
        with self._lock:
            if self._tower is None:
                tower = self._build()
                for fn in self._after:
                    fn(tower)
                if isinstance(tower, torch.nn.Module):
                    tower = tower.to(self._device).eval()
                self._tower = tower
            return self._tower

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self._preprocess(image)

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower().encode(pixels)

    def to(self, device: torch.device | str) -> "DeferredTower":
        self._device = torch.device(device)
        if self._tower is not None and isinstance(self._tower, torch.nn.Module):
            self._tower.to(self._device)
        return self

    def __getattr__(self, name: str) -> Any:  # only called for names not defined above
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.tower(), name)
