"""The table of reranker kinds: the ``"kind"`` a model folder's ``"reranker"`` section names -> the class that
builds that layout (a ``base.Reranker``). The model folders (``model_dir``), the presets (``registry.
build_reranker``), the exporters and the CLI look kinds up here; a new kind is one module holding its class plus
one entry below.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from edje_qdrant.errors import ModelError
from edje_qdrant.models.base import Reranker

# kind -> "module:class". Named, not imported: the full-joint layout imports transformers (seconds), which a
# search with the split layout never needs.
KINDS = {
    "edje": "edje_qdrant.models.full_joint:FullJointReranker",  # the official EDJE layout
    "split": "edje_qdrant.models.split_joint:SplitJointReranker",  # the bundled preset's layout
}
DEFAULT_KIND = "edje"  # a "reranker" section without "kind" (written before there were two)


def reranker_class(kind: str, where: str = "config.json") -> type[Reranker]:
    """The class of ``kind``; ModelError naming ``where`` and the known kinds when there is none."""
    if kind not in KINDS:
        raise ModelError(f"{where}: reranker kind {kind!r} is not one of {', '.join(map(repr, KINDS))}")
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def kind_of(section: Mapping[str, Any]) -> str:
    """The kind a ``"reranker"`` section names (``DEFAULT_KIND`` when it names none)."""
    return str(section.get("kind", DEFAULT_KIND))


def reranker_from_config(section: Mapping[str, Any], where: str = "config.json", *, minilm_wheel: Any = None
                         ) -> Reranker:
    """A freshly initialised reranker of the kind and shape in a ``"reranker"`` section (see
    ``Reranker.from_config`` for ``minilm_wheel``)."""
    return reranker_class(kind_of(section), where).from_config(section, minilm_wheel=minilm_wheel)
