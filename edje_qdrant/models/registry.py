"""Named presets and the one factory ``load_model(name_or_path)``.

A preset is a function ``factory(spec: PresetSpec) -> EdjeModel`` registered under a name. It builds towers and
reranker on the CPU in float32 (``fingerprint`` may be left empty); ``load_model`` then loads any weights from a
local directory, puts everything in eval mode on the device, and computes the fingerprint.

A local directory works like a preset name: its ``config.json`` names the preset (``"preset": ...``) and may hold
preset options plus a ``"reranker"`` section (``RerankerConfig`` fields). When that section is present the factory
must build the reranker from it (``build_reranker(spec, default)`` does this) and the weights come from the
directory's ``weights.safetensors``: reranker keys as they are (``adapter.*``, ``bert.*``, ``head.*``), optional tower
keys under ``vision_tower.`` / ``text_tower.`` (towers that are ``nn.Module``s). ``convert`` writes this layout.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from edje_qdrant.errors import CheckpointKeyError, InputError, ModelError
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.models.reranker import EdjeReranker, RerankerConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
_TOWER_PREFIXES = {"vision_tower.": "vision", "text_tower.": "text"}


@dataclass
class PresetSpec:
    """What a preset factory is asked to build."""

    name: str  # preset name
    config: dict[str, Any] = field(default_factory=dict)  # options from a directory's config.json ({} for a name)
    directory: Path | None = None  # the local model directory, when loading from one
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # final device (build on CPU)
    precision: str = "fp32"

    @property
    def reranker_config(self) -> RerankerConfig | None:
        section = self.config.get("reranker")
        return RerankerConfig.from_dict(section) if isinstance(section, dict) else None


PresetFactory = Callable[[PresetSpec], EdjeModel]
_PRESETS: dict[str, PresetFactory] = {}


def register_preset(name: str, factory: PresetFactory) -> None:
    """Register ``factory`` under ``name`` (re-registering the same name replaces it)."""
    if not name or "/" in name:
        raise InputError(f"preset name {name!r} must be non-empty and contain no '/'")
    _PRESETS[name] = factory


def _ensure_builtin() -> None:
    """Import the modules that register the bundled presets (each registers itself on import)."""
    import importlib

    for mod in ("tiny", "siglip2", "flickr8k_preset"):
        try:
            importlib.import_module(f"edje_qdrant.models.{mod}")
        except ImportError as exc:  # a preset module that is absent or whose optional deps are missing
            if getattr(exc, "name", "") not in (f"edje_qdrant.models.{mod}",):
                log.debug("preset module %s not available: %s", mod, exc)


def available_presets() -> list[str]:
    """Sorted names accepted by ``load_model``."""
    _ensure_builtin()
    return sorted(_PRESETS)


def build_reranker(spec: PresetSpec, default: Callable[[], EdjeReranker]) -> EdjeReranker:
    """The reranker a factory should use: from the directory's config when it has one, else ``default()``."""
    cfg = spec.reranker_config
    return EdjeReranker(cfg) if cfg is not None else default()


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
def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a torch device (use cpu, cuda, cuda:0, mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def _resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision in (None, "auto"):
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16_ok else "fp32"
    if precision not in ("fp32", "bf16"):
        raise InputError(f"precision {precision!r} is not one of fp32, bf16, auto")
    return precision


def _read_dir_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{directory}: no config.json; a model directory needs one naming its preset "
                         f"(\"preset\": one of {available_presets()}). For an official checkpoint use "
                         "`convert` first")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("preset"), str):
        raise ModelError(f"{cfg_path}: needs a string field \"preset\" (one of {available_presets()})")
    return cfg


def _load_dir_weights(model: EdjeModel, directory: Path, require_reranker: bool) -> None:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if require_reranker:
            raise ModelError(f"{directory}: config.json has a \"reranker\" section but {WEIGHTS_FILE} is missing")
        return
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    groups: dict[str, dict[str, torch.Tensor]] = {"reranker": {}, "vision": {}, "text": {}}
    for key, t in tensors.items():
        role = next((r for p, r in _TOWER_PREFIXES.items() if key.startswith(p)), "reranker")
        groups[role][key.split(".", 1)[1] if role != "reranker" else key] = t
    targets = {"reranker": model.reranker, "vision": model.vision, "text": model.text}
    for role, sd in groups.items():
        if not sd:
            continue
        module = targets[role]
        if not isinstance(module, nn.Module):
            raise ModelError(f"{path}: has {role} tower weights but the {role} tower of preset {model.name!r} "
                             "takes no weights")
        want = module.state_dict()
        if role == "reranker":  # the optional MLM head is not part of stored models
            want = {k: v for k, v in want.items() if not k.startswith("mlm.")}
        missing = sorted(set(want) - set(sd))
        unexpected = sorted(set(sd) - set(want))
        shapes = [f"{k}: file {list(sd[k].shape)} vs model {list(want[k].shape)}"
                  for k in sd if k in want and sd[k].shape != want[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointKeyError(f"{path} ({role}): missing {missing}, unexpected {unexpected}, "
                                     f"shape mismatches {shapes}")
        module.load_state_dict({k: v.to(want[k].dtype) for k, v in sd.items()}, strict=False)


def _place(obj: Any, device: torch.device) -> None:
    if isinstance(obj, nn.Module):
        obj.to(device).eval()
    elif callable(getattr(obj, "to", None)):
        obj.to(device)


def load_model(name_or_path: str, device: str | None = None, precision: str | None = None) -> EdjeModel:
    """Build a model from a preset name or a local model directory (config.json + weights.safetensors).

    ``device``: None = cuda when available, else cpu. ``precision``: "fp32", "bf16" or None (bf16 on capable GPUs).
    """
    dev = _resolve_device(device)
    prec = _resolve_precision(precision, dev)
    presets = available_presets()
    path = Path(str(name_or_path)).expanduser()
    directory: Path | None = None
    config: dict[str, Any] = {}
    if name_or_path in _PRESETS:
        name = str(name_or_path)
    elif path.is_dir():
        directory, config = path, _read_dir_config(path)
        name = config["preset"]
        if name not in _PRESETS:
            raise ModelError(f"{path / 'config.json'}: unknown preset {name!r}; available: {presets}")
    elif path.exists():
        raise ModelError(f"{path} is a file; pass a model directory (config.json + {WEIGHTS_FILE}) or a preset "
                         f"name ({presets}). Official checkpoints go through `convert` first")
    else:
        raise ModelError(f"unknown model {name_or_path!r}: not a preset ({presets}) and no such directory")
    spec = PresetSpec(name=name, config=config, directory=directory, device=dev, precision=prec)
    model = _PRESETS[name](spec)
    if directory is not None:
        _load_dir_weights(model, directory, require_reranker=spec.reranker_config is not None)
    for part in (model.vision, model.text, model.reranker):
        _place(part, torch.device("cpu"))
    model.fingerprint = fingerprint(model)
    for part in (model.vision, model.text, model.reranker):
        _place(part, dev)
    model.device = dev
    model.precision = prec
    log.info("loaded model %s (%s) on %s, %s", name, model.fingerprint, dev, prec)
    return model
