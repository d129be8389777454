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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from edje_qdrant.errors import CheckpointKeyError, InputError, ModelError
from edje_qdrant.models.base import EdjeModel

if TYPE_CHECKING:  # reranker imports transformers (seconds); loaded only by the presets that use it
    from edje_qdrant.models.reranker import EdjeReranker, RerankerConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
_TOWER_PREFIXES = {"vision_tower.": "vision", "text_tower.": "text"}


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
    def reranker_config(self) -> "RerankerConfig | None":
        section = self.config.get("reranker")
        if not isinstance(section, dict):
            return None
        from edje_qdrant.models.reranker import RerankerConfig

        return RerankerConfig.from_dict(section)


PresetFactory = Callable[[PresetSpec], EdjeModel]
SourcesFn = Callable[[PresetSpec], Sequence[Path]]
_PRESETS: dict[str, PresetFactory] = {}
_SOURCES: dict[str, SourcesFn] = {}
# Bundled presets and the module that registers each (imported on first use: each pulls in its own libraries).
_BUILTIN = {"tiny-random": "tiny", "siglip2-l16-384-edje": "siglip2", "flickr8k-dinov2s-minilm6": "flickr8k_preset"}


def register_preset(name: str, factory: PresetFactory, sources: SourcesFn | None = None) -> None:
    """Register ``factory`` under ``name`` (re-registering the same name replaces it).

    ``sources(spec)``: the files that fully determine the weights. With it, the fingerprint is cached per
    (name, versions, files' size and mtime), so a factory may defer towers the caller does not need
    (``PresetSpec.parts``) and ``load_model`` still knows the fingerprint without hashing them.
    """
    if not name or "/" in name:
        raise InputError(f"preset name {name!r} must be non-empty and contain no '/'")
    _PRESETS[name] = factory
    if sources is None:
        _SOURCES.pop(name, None)
    else:
        _SOURCES[name] = sources


def _import_preset_module(mod: str) -> None:
    import importlib

    try:
        importlib.import_module(f"edje_qdrant.models.{mod}")
    except ImportError as exc:  # a preset module that is absent or whose optional deps are missing
        if getattr(exc, "name", "") not in (f"edje_qdrant.models.{mod}",):
            log.debug("preset module %s not available: %s", mod, exc)


def _ensure_builtin() -> None:
    """Import the modules that register the bundled presets (each registers itself on import)."""
    for mod in dict.fromkeys(_BUILTIN.values()):
        _import_preset_module(mod)


def _has_preset(name: str) -> bool:
    """Whether ``name`` is registered, importing only its own bundled module when needed."""
    if name not in _PRESETS and name in _BUILTIN:
        _import_preset_module(_BUILTIN[name])
    return name in _PRESETS


def available_presets() -> list[str]:
    """Sorted names accepted by ``load_model``."""
    _ensure_builtin()
    return sorted(_PRESETS)


def build_reranker(spec: PresetSpec, default: Callable[[], "EdjeReranker"]) -> "EdjeReranker":
    """The reranker a factory should use: from the directory's config when it has one, else ``default()``."""
    cfg = spec.reranker_config
    if cfg is None:
        return default()
    from edje_qdrant.models.reranker import EdjeReranker

    return EdjeReranker(cfg)


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


# ---------------------------------------------------------------- fingerprint cache
def _fingerprint_cache_file() -> Path:
    from edje_qdrant.models.dinov2 import cache_dir

    return cache_dir() / "fingerprints.json"


def _fingerprint_key(spec: PresetSpec) -> str | None:
    """sha256 of the preset name, library versions and the size/mtime of every weight source; None if unknown."""
    sources = _SOURCES.get(spec.name)
    if sources is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    items: list[Any] = [spec.name]
    for package in ("edje-qdrant", "torch", "transformers", "safetensors"):
        try:
            items.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            items.append(f"{package}=?")
    try:
        for src in sources(spec):
            st = Path(src).stat()
            items.append([str(Path(src).resolve()), st.st_size, st.st_mtime_ns])
    except (OSError, ModelError):
        return None  # a source is missing: the factory reports it with its own message
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _read_fingerprints() -> dict[str, str]:
    try:
        data = json.loads(_fingerprint_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached_fingerprint(key: str) -> str | None:
    value = _read_fingerprints().get(key)
    return value if isinstance(value, str) else None


def _store_fingerprint(key: str, value: str) -> None:
    """Remember a computed fingerprint (best effort: a read-only cache folder only costs speed)."""
    import os

    path = _fingerprint_cache_file()
    data = _read_fingerprints()
    data[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("could not cache the model fingerprint in %s: %s", path, exc)


def _place(obj: Any, device: torch.device) -> None:
    if isinstance(obj, nn.Module):
        obj.to(device).eval()
    elif callable(getattr(obj, "to", None)):
        obj.to(device)


def load_model(name_or_path: str, device: str | None = None, precision: str | None = None, *,
               parts: Iterable[str] | None = None) -> EdjeModel:
    """Build a model from a preset name or a local model directory (config.json + weights.safetensors).

    ``device``: None = cuda when available, else cpu. ``precision``: "fp32", "bf16" or None (bf16 on capable GPUs).
    ``parts``: the parts the caller uses (e.g. ``("text", "reranker")`` for text search). Presets that declare
    their weight sources then skip loading the others until first use, once their fingerprint is cached.
    """
    dev = _resolve_device(device)
    prec = _resolve_precision(precision, dev)
    wanted = ALL_PARTS if parts is None else frozenset(parts)
    if not wanted <= ALL_PARTS:
        raise InputError(f"parts must be among {sorted(ALL_PARTS)}, got {sorted(wanted)}")
    path = Path(str(name_or_path)).expanduser()
    directory: Path | None = None
    config: dict[str, Any] = {}
    if _has_preset(str(name_or_path)):
        name = str(name_or_path)
    elif path.is_dir():
        directory, config = path, _read_dir_config(path)
        name = config["preset"]
        if not _has_preset(name):
            raise ModelError(f"{path / 'config.json'}: unknown preset {name!r}; available: {available_presets()}")
    elif path.exists():
        raise ModelError(f"{path} is a file; pass a model directory (config.json + {WEIGHTS_FILE}) or a preset "
                         f"name ({available_presets()}). Official checkpoints go through `convert` first")
    else:
        raise ModelError(f"unknown model {name_or_path!r}: not a preset ({available_presets()}) and no such "
                         "directory")
    spec = PresetSpec(name=name, config=config, directory=directory, device=dev, precision=prec)
    cache_key = _fingerprint_key(spec)
    known = _cached_fingerprint(cache_key) if cache_key and directory is None else None
    if known is not None:
        spec.parts = wanted  # the fingerprint is known: towers nobody asked for may load on first use
    model = _PRESETS[name](spec)
    if directory is not None:
        _load_dir_weights(model, directory, require_reranker=spec.reranker_config is not None)
    for part in (model.vision, model.text, model.reranker):
        _place(part, torch.device("cpu"))
    if known is not None:
        model.fingerprint = known
    else:
        model.fingerprint = fingerprint(model)
        if cache_key and directory is None:
            _store_fingerprint(cache_key, model.fingerprint)
    for part in (model.vision, model.text, model.reranker):
        _place(part, dev)
    model.device = dev
    model.precision = prec
    log.info("loaded model %s (%s) on %s, %s", name, model.fingerprint, dev, prec)
    return model
