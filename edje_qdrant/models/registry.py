"""Named presets and the one factory ``load_model(name_or_path)``.

A preset (``preset.Preset``) is a function ``build(spec: PresetSpec) -> EdjeModel`` under a name. It builds towers
and reranker on the CPU in float32 (``fingerprint`` may be left empty); ``load_model`` then loads any weights from a
local directory, puts everything in eval mode on the device, and computes the fingerprint. The bundled presets are
the ``PRESET`` of their modules (``_BUILTIN``); others are added with ``register_preset``.

A model folder (``models/model_dir.py``: config.json + weights.safetensors) works like a preset name: its config
names the preset and may hold preset options and a ``"reranker"`` section; the factory builds that reranker
(``preset.build_reranker``) and ``load_model`` overlays the folder's weights with the one loader. A preset may ship
its own folder (``Preset.folder``); loading its name loads that folder.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from edje_qdrant.errors import InputError, ModelError
from edje_qdrant.models import fingerprint_cache, model_dir
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.models.deferred import DeferredTower
from edje_qdrant.models.device import resolve_device, resolve_precision
from edje_qdrant.models.model_dir import WEIGHTS_FILE
from edje_qdrant.models.preset import ALL_PARTS, Preset, PresetFactory, PresetSpec, SourcesFn

log = logging.getLogger(__name__)

__all__ = ["PresetSpec", "available_presets", "fingerprint", "load_model", "register_preset", "state_digest"]

_PRESETS: dict[str, Preset] = {}
# Bundled presets and the module that defines each (``PRESET``), imported on first use: each pulls in its own
# libraries (transformers, onnx...), which loading another preset must not pay for.
_BUILTIN = {"tiny-random": "tiny", "siglip2-l16-384-edje": "siglip2", "flickr8k-dinov2s-minilm6": "flickr8k_preset"}


def register_preset(name: str, factory: PresetFactory, folder: Path | None = None,
                    sources: SourcesFn | None = None) -> None:
    """Register ``factory`` under ``name`` (re-registering the same name replaces it); ``folder`` and ``sources``
    as in ``preset.Preset``."""
    if not name or "/" in name:
        raise InputError(f"preset name {name!r} must be non-empty and contain no '/'")
    _PRESETS[name] = Preset(name, factory, folder, sources)


def _import_builtin(mod: str) -> None:
    """Import a bundled preset module and register its ``PRESET`` (a module whose optional libraries are missing
    is skipped)."""
    try:
        module = importlib.import_module(f"edje_qdrant.models.{mod}")
    except ImportError as exc:  # a preset module that is absent or whose optional deps are missing
        if getattr(exc, "name", "") not in (f"edje_qdrant.models.{mod}",):
            log.debug("preset module %s not available: %s", mod, exc)
        return
    preset = module.PRESET
    _PRESETS.setdefault(preset.name, preset)


def _ensure_builtin() -> None:
    """Register the bundled presets."""
    for mod in dict.fromkeys(_BUILTIN.values()):
        _import_builtin(mod)


def _has_preset(name: str) -> bool:
    """Whether ``name`` is registered, importing only its own bundled module when needed."""
    if name not in _PRESETS and name in _BUILTIN:
        _import_builtin(_BUILTIN[name])
    return name in _PRESETS


def available_presets() -> list[str]:
    """Sorted names accepted by ``load_model``."""
    _ensure_builtin()
    return sorted(_PRESETS)


# ---------------------------------------------------------------- fingerprint
def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def state_digest(modules: dict[str, nn.Module]) -> str:
    """sha256 over the named modules' state dicts (sorted keys, dtype, shape, raw bytes)."""
    h = hashlib.sha256()
    for prefix in sorted(modules):
        sd = modules[prefix].state_dict()
        for key in sorted(sd):
            t = sd[key]
            h.update(f"{prefix}.{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def fingerprint(model: EdjeModel) -> str:
    """``<name>-<12 hex>``: preset name + short sha256 of reranker and (module) tower weights."""
    mods: dict[str, nn.Module] = {"reranker": model.reranker}
    for role in ("vision", "text"):
        tower = getattr(model, role)
        if isinstance(tower, nn.Module):
            mods[role] = tower
        elif getattr(tower, "weights_id", None):
            h = hashlib.sha256(str(tower.weights_id).encode()).hexdigest()
            mods[role] = _IdModule(h)
    return f"{model.name}-{state_digest(mods)[:12]}"


class _IdModule(nn.Module):
    def __init__(self, ident: str) -> None:
        super().__init__()
        self.register_buffer("ident", torch.tensor(list(ident.encode()), dtype=torch.uint8), persistent=True)


# ---------------------------------------------------------------- loading
def _load_dir_weights(model: EdjeModel, directory: Path, config: dict[str, Any]) -> None:
    """Overlay the folder's weights on what the factory built (one loader for every preset)."""
    path = model_dir.weights_file(directory)
    if path is None:
        if "reranker" in config:
            raise ModelError(f"{directory}: config.json has a \"reranker\" section but {WEIGHTS_FILE} is missing")
        return
    parts = model_dir.read_weights(path)
    if "reranker" in config and not parts["reranker"]:
        raise ModelError(f"{path}: config.json has a \"reranker\" section but the file holds no reranker weights")
    targets = {"reranker": model.reranker, "vision": model.vision, "text": model.text}
    for part, state in parts.items():
        if not state:
            continue
        module = targets[part]
        base = model.reranker.optional_weights() if part == "reranker" else model.base_weights.get(part, ())
        if isinstance(module, DeferredTower):  # loads its weights when first built
            module.after_build(lambda tower, state=state, part=part, base=base:
                               model_dir.load_part(tower, state, f"{path} ({part})", base))
            continue
        if not isinstance(module, nn.Module):
            raise ModelError(f"{path}: has {part} weights but the {part} tower of preset {model.name!r} "
                             "takes no weights")
        model_dir.load_part(module, state, f"{path} ({part})", base)


def _place(obj: Any, device: torch.device) -> None:
    if isinstance(obj, nn.Module):
        obj.to(device).eval()
    elif callable(getattr(obj, "to", None)):
        obj.to(device)


def load_model(name_or_path: str, device: str | None = None, precision: str | None = None, *,
               parts: Iterable[str] | None = None) -> EdjeModel:
    """Build a model from a preset name or a local model folder (``model_dir``: config.json + weights).

    ``device``: None = cuda when available, else cpu. ``precision``: "fp32", "bf16", "auto" or None (fp32 on the
    CPU, auto elsewhere; see ``models/device.py``). ``parts``: the parts the caller uses (e.g. ``("text",
    "reranker")`` for text search); presets that declare their weight sources then build the others on first use,
    once their fingerprint is cached.
    """
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    wanted = ALL_PARTS if parts is None else frozenset(parts)
    if not wanted <= ALL_PARTS:
        raise InputError(f"parts must be among {sorted(ALL_PARTS)}, got {sorted(wanted)}")
    name, directory, config = _resolve(name_or_path)
    spec = PresetSpec(name=name, config=config, directory=directory, device=dev, precision=prec)
    named = str(name_or_path) == name  # a preset name (its own folder, if any): the fingerprint may be cached
    cache_key = _cache_key(spec) if named else None
    known = fingerprint_cache.get(cache_key) if cache_key else None
    if known is not None:
        spec.parts = wanted  # the fingerprint is known: towers nobody asked for may load on first use
    model = _PRESETS[name].build(spec)
    if directory is not None:
        _load_dir_weights(model, directory, config)
    for part in (model.vision, model.text, model.reranker):
        _place(part, torch.device("cpu"))
    if known is not None:
        model.fingerprint = known
    else:
        model.fingerprint = fingerprint(model)
        if cache_key:
            fingerprint_cache.put(cache_key, model.fingerprint)
    for part in (model.vision, model.text, model.reranker):
        _place(part, dev)
    model.device = dev
    model.precision = prec
    model.source = name if named else str(directory.resolve())  # what another process rebuilds it from
    log.info("loaded model %s (%s) on %s, %s", name, model.fingerprint, dev, prec)
    return model


def _cache_key(spec: PresetSpec) -> str | None:
    sources = _PRESETS[spec.name].sources
    if sources is None:
        return None
    try:
        return fingerprint_cache.key(spec.name, sources(spec))
    except ModelError:  # a source is missing: the factory reports it with its own message
        return None


def _resolve(name_or_path: str) -> tuple[str, Path | None, dict[str, Any]]:
    """(preset name, model folder or None, its config) for a preset name or a model folder path."""
    if _has_preset(str(name_or_path)):
        name = str(name_or_path)
        directory = _PRESETS[name].folder
        return name, directory, model_dir.read_config(directory, _PRESETS) if directory is not None else {}
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        config = model_dir.read_config(path, available_presets())
        if not _has_preset(config["preset"]):
            raise ModelError(f"{path / 'config.json'}: unknown preset {config['preset']!r}; available: "
                             f"{available_presets()}")
        return config["preset"], path, config
    if path.exists():
        raise ModelError(f"{path} is a file; pass a model directory (config.json + {WEIGHTS_FILE}) or a preset "
                         f"name ({available_presets()}). Official checkpoints go through `convert` first")
    raise ModelError(f"unknown model {name_or_path!r}: not a preset ({available_presets()}) and no such directory")
