"""Models: towers, adapter + joint encoder (reranker), presets. Entry point: ``load_model(name_or_path)``.

Attributes are imported lazily so ``import edje_qdrant.models`` does not pull in torch/transformers by itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["load_model", "register_preset", "available_presets", "convert_official", "EdjeModel",
           "EdjeReranker", "RerankerConfig", "PresetSpec"]

_WHERE = {
    "load_model": "registry", "register_preset": "registry", "available_presets": "registry",
    "PresetSpec": "registry", "convert_official": "official", "EdjeModel": "base",
    "EdjeReranker": "reranker", "RerankerConfig": "reranker",
}

if TYPE_CHECKING:  # pragma: no cover
    from edje_qdrant.models.base import EdjeModel
    from edje_qdrant.models.official import convert_official
    from edje_qdrant.models.registry import PresetSpec, available_presets, load_model, register_preset
    from edje_qdrant.models.reranker import EdjeReranker, RerankerConfig


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"edje_qdrant.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'edje_qdrant.models' has no attribute {name!r}")
