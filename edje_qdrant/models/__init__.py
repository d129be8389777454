"""Models: towers, the joint encoder (a ``Reranker`` of one of the kinds in ``kinds.py``), presets. Entry point:
``load_model(name_or_path)``.

Attributes are imported lazily so ``import edje_qdrant.models`` does not pull in torch/transformers by itself.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["load_model", "register_preset", "available_presets", "convert_official", "EdjeModel", "Reranker",
           "FullJointReranker", "FullJointConfig", "SplitJointReranker", "SplitJointConfig", "PresetSpec"]

_WHERE = {
    "load_model": "registry", "register_preset": "registry", "available_presets": "registry",
    "PresetSpec": "preset", "convert_official": "official", "EdjeModel": "base", "Reranker": "base",
    "FullJointReranker": "full_joint", "FullJointConfig": "full_joint",
    "SplitJointReranker": "split_joint", "SplitJointConfig": "split_joint",
}
# names before the layouts were named; kept because code outside this repository may import them from here
_OLD_NAMES = {"EdjeReranker": "FullJointReranker", "RerankerConfig": "FullJointConfig"}

if TYPE_CHECKING:  # pragma: no cover
    from edje_qdrant.models.base import EdjeModel, Reranker
    from edje_qdrant.models.full_joint import FullJointConfig, FullJointReranker
    from edje_qdrant.models.official import convert_official
    from edje_qdrant.models.preset import PresetSpec
    from edje_qdrant.models.registry import available_presets, load_model, register_preset
    from edje_qdrant.models.split_joint import SplitJointConfig, SplitJointReranker


def __getattr__(name: str) -> Any:
    name = _OLD_NAMES.get(name, name)
    if name in _WHERE:
        return getattr(importlib.import_module(f"edje_qdrant.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'edje_qdrant.models' has no attribute {name!r}")
