"""Official EDJE checkpoints -> ``FullJointReranker`` (strict), and conversion to the project's compact format.

Accepted sources: the training checkpoint (``torch.save({'model': state_dict, ...})``), a bare state dict
(``.pth``/``.pt``/``.bin``/``.ckpt`` read with ``torch.load(weights_only=True)`` only, never unpickled otherwise),
``.safetensors`` files, a directory holding one of those, or a hub repo id (when online and ``huggingface_hub`` is
installed). Key handling, deliberately:

* ``vision_projection.*`` -> ``adapter.*``, ``language_model.bert.*`` -> ``bert.*``, ``classification_head.*`` ->
  ``head.*``; ``language_model.cls.*`` (MLM head) -> ``mlm.*`` when the MLM head is asked for, else skipped.
* ``vision_encoder.*`` (SigLIP vision copy, named ``vision_encoder.vision_model.*`` under transformers 4 and
  ``vision_encoder.*`` under 5) and ``clip.*`` (SigLIP dual encoder) are recognised and returned separately (the
  SigLIP2 preset can use them); ``text_projection.*`` is recognised and skipped (the score does not use it).
* Tied copies: the word embedding is stored as ``language_model.bert.embeddings.word_embeddings.weight``,
  ``text_embeddings.weight`` and ``language_model.cls.predictions.decoder.weight``; the MLM bias as
  ``language_model.cls.predictions.bias`` and ``...decoder.bias``. The first name is used; every other copy
  present must be equal, else the load fails.
* A uniform ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix on all keys is removed.
* Anything else is an unexpected key; keys the model needs and does not find are missing; shapes must match.
  All problems are listed in one ``CheckpointKeyError``; nothing is loaded partially.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from edje_qdrant.errors import CheckpointKeyError, ModelError
from edje_qdrant.models import model_dir
from edje_qdrant.models.full_joint import FullJointConfig, FullJointReranker

log = logging.getLogger(__name__)

OFFICIAL_HUB_REPO = "shahafw/edje-vl-image-retrieval-reranker"
CONVERTED_FROM = "source"  # the field of a converted folder's config.json naming the checkpoint it came from

_RENAMES = (
    ("vision_projection.", "adapter."),
    ("language_model.bert.", "bert."),
    ("classification_head.", "head."),
    ("language_model.cls.", "mlm."),
)
_WORD_EMB = "language_model.bert.embeddings.word_embeddings.weight"
_WORD_EMB_COPIES = ("text_embeddings.weight", "language_model.cls.predictions.decoder.weight")
_MLM_BIAS = "language_model.cls.predictions.bias"
_MLM_BIAS_COPIES = ("language_model.cls.predictions.decoder.bias",)
_SKIPPED_PREFIXES = ("text_projection.",)
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WEIGHT_SUFFIXES = (".safetensors", *_PICKLE_SUFFIXES)
# bert width -> heads, vision width -> heads, for checkpoints given without a config (shapes cannot tell heads)
_KNOWN_BERT_HEADS = {384: 12, 768: 12, 1024: 16}
_KNOWN_VISION_HEADS = {768: 12, 1024: 16, 1152: 16}


@dataclass
class OfficialCheckpoint:
    """An official state dict split by role; ``edje`` keeps the official key names."""

    source: str
    edje: dict[str, torch.Tensor]
    vision_encoder: dict[str, torch.Tensor] = field(default_factory=dict)  # SiglipVisionModel inner names
    clip: dict[str, torch.Tensor] = field(default_factory=dict)  # SiglipModel names (clip. removed)
    skipped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading files
def _read_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    if suffix in _PICKLE_SUFFIXES:
        try:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{path}: refused or unreadable with torch.load(weights_only=True) ({exc}). Only "
                             "plain tensor checkpoints are loaded; convert others to .safetensors") from exc
        if not isinstance(obj, dict):
            raise ModelError(f"{path}: holds a {type(obj).__name__}, expected a state dict or a dict with 'model'")
        return obj
    raise ModelError(f"{path}: unknown weight file type {suffix!r}; expected one of {list(_WEIGHT_SUFFIXES)}")


def _pick_in_dir(directory: Path) -> list[Path]:
    """Weight files of a checkpoint directory: all safetensors shards, else exactly one torch file."""
    shards = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if shards:
        return shards
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in _PICKLE_SUFFIXES)
    if len(found) == 1:
        return found
    if not found:
        raise ModelError(f"{directory}: no checkpoint found; looked for *.safetensors, "
                         f"{', '.join('*' + s for s in _PICKLE_SUFFIXES)}")
    raise ModelError(f"{directory}: several checkpoints {[p.name for p in found]}; pass the file to load")


def _pick_hub_file(files: list[str]) -> list[str]:
    names = [f for f in files if f.lower().endswith(_WEIGHT_SUFFIXES)]
    shards = sorted(f for f in names if f.lower().endswith(".safetensors"))
    if shards:
        return shards
    return sorted(names)[:1] if len(names) == 1 else []


def _download(repo_id: str, revision: str | None) -> list[Path]:
    looked = f"*.safetensors or a single {'/'.join('*' + s for s in _PICKLE_SUFFIXES)} file"
    try:
        import huggingface_hub  # cost: the hub client, only when a checkpoint is downloaded
    except ImportError as exc:
        raise ModelError(f"{repo_id!r} is not a local file or directory, and downloading it needs "
                         "huggingface_hub (pip install huggingface_hub)") from exc
    try:  # a cached snapshot first, so an offline machine with the files cached works
        snap = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
        cached = _pick_hub_file([str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()])
        if cached:
            return [snap / f for f in cached]
    except Exception:  # not cached: go online
        pass
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception as exc:
        raise ModelError(f"cannot reach the Hugging Face hub for {repo_id!r} ({type(exc).__name__}: {exc}); "
                         f"download the checkpoint ({looked}) and pass its local path") from exc
    picked = _pick_hub_file(files)
    if not picked:
        raise ModelError(f"hub repo {repo_id!r} has no recognised checkpoint file: looked for {looked}, "
                         f"found {sorted(files)}")
    try:
        return [Path(huggingface_hub.hf_hub_download(repo_id, f, revision=revision)) for f in picked]
    except Exception as exc:
        raise ModelError(f"downloading {picked} from {repo_id!r} failed ({exc}); download it by hand and "
                         "pass its local path") from exc


def _unwrap(obj: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object (``model`` or ``state_dict`` entry, or the object itself)."""
    for k in ("model", "state_dict"):
        if isinstance(obj.get(k), dict):
            obj = obj[k]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{where}: not a state dict (non-tensor entries {bad[:8]}); expected a bare state dict "
                         "or a training checkpoint with the state dict under 'model'")
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def read_state_dict(source: str | Path, revision: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Raw official state dict from a file, a directory or a hub repo id; returns (state dict, description)."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _pick_in_dir(path)
    elif re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(source)) and not str(source).startswith((".", "/")):
        files = _download(str(source), revision)
    else:
        raise ModelError(f"checkpoint {str(source)!r} not found: pass a file (.safetensors/.pth/.bin), a "
                         "directory holding one, or a hub repo id like owner/name")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_unwrap(_read_file(f), str(f)))
    return state, ", ".join(str(f) for f in files)


def split_official(state: dict[str, torch.Tensor], source: str = "checkpoint") -> OfficialCheckpoint:
    """Split an official state dict into the EDJE part and the SigLIP copies."""
    ckpt = OfficialCheckpoint(source=source, edje={})
    for key, t in state.items():
        if key.startswith("vision_encoder."):
            inner = key[len("vision_encoder."):]
            ckpt.vision_encoder[inner[len("vision_model."):] if inner.startswith("vision_model.") else inner] = t
        elif key.startswith("clip."):
            ckpt.clip[key[len("clip."):]] = t
        else:
            ckpt.edje[key] = t
    return ckpt


# ---------------------------------------------------------------- config
def _int_or(cfg: dict[str, Any], *path: str) -> Any:
    cur: Any = cfg
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _overrides(config: dict[str, Any] | None) -> dict[str, Any]:
    """Accept our ``FullJointConfig`` fields or the compat/official config layout (vision/bert sections)."""
    if not config:
        return {}
    if "reranker" in config and isinstance(config["reranker"], dict):
        config = config["reranker"]
    out = {k: v for k, v in config.items() if k in FullJointConfig.__dataclass_fields__}
    mapping = {
        "vision_heads": ("vision", "num_attention_heads"), "vision_eps": ("vision", "layer_norm_eps"),
        "num_heads": ("bert", "num_attention_heads"), "layer_norm_eps": ("bert", "layer_norm_eps"),
        "hidden_act": ("bert", "hidden_act"), "pad_token_id": ("bert", "pad_token_id"),
        "num_tokens": ("num_compressed_tokens",), "adapter_hidden": ("multimodal_projection_hidden_dim",),
        "image_token_id": ("image_token_id",), "max_text_tokens": ("max_text_context_length",),
    }
    for ours, path in mapping.items():
        v = _int_or(config, *path)
        if v is not None and ours not in out:
            out[ours] = v
    return out


def reranker_config_from_official(edje: dict[str, torch.Tensor], config: dict[str, Any] | None = None,
                                  mlm_head: bool = False) -> FullJointConfig:
    """Sizes from the checkpoint's shapes; heads, eps and ids from ``config`` or the known real models."""
    if "vision_projection.0.weight" in edje:
        raise ModelError("checkpoint uses the MLP vision projection (num_compressed_tokens=None, 576 image tokens); "
                         "only the token-compression adapter layout (vision_projection.query ...) is supported")
    need = ["vision_projection.query", "vision_projection.mlp.fc1.weight", "vision_projection.projection.weight",
            "language_model.bert.embeddings.position_embeddings.weight",
            "language_model.bert.embeddings.token_type_embeddings.weight",
            "language_model.bert.encoder.layer.0.intermediate.dense.weight"]
    absent = [k for k in need if k not in edje]
    if absent or not any(k in edje for k in (_WORD_EMB, *_WORD_EMB_COPIES)):
        raise CheckpointKeyError(f"not an official EDJE checkpoint: missing keys {absent or [_WORD_EMB]}")
    ov = _overrides(config)
    q = edje["vision_projection.query"].shape
    hidden = int(edje["vision_projection.projection.weight"].shape[0])
    word = next(edje[k] for k in (_WORD_EMB, *_WORD_EMB_COPIES) if k in edje)
    layers = 1 + max(int(m.group(1)) for k in edje
                     if (m := re.match(r"language_model\.bert\.encoder\.layer\.(\d+)\.", k)))
    vision_width = int(q[2])
    vals: dict[str, Any] = dict(
        vision_width=vision_width, num_tokens=int(q[1]),
        adapter_hidden=int(edje["vision_projection.mlp.fc1.weight"].shape[0]),
        hidden_size=hidden, num_layers=layers,
        intermediate_size=int(edje["language_model.bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        vocab_size=int(word.shape[0]),
        max_position_embeddings=int(edje["language_model.bert.embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(edje["language_model.bert.embeddings.token_type_embeddings.weight"].shape[0]),
        image_token_id=int(word.shape[0]) - 1, mlm_head=mlm_head,
    )
    for k in ("vision_width", "num_tokens", "adapter_hidden", "hidden_size", "num_layers", "intermediate_size",
              "vocab_size", "max_position_embeddings", "type_vocab_size"):
        if k in ov and int(ov[k]) != vals[k]:
            raise ModelError(f"config says {k}={ov[k]} but the checkpoint's shapes give {vals[k]}")
    vals.update({k: v for k, v in ov.items() if k not in vals or k in ("image_token_id", "mlm_head")})
    if "vision_heads" not in vals:
        if vision_width not in _KNOWN_VISION_HEADS:
            raise ModelError(f"cannot tell the adapter's attention heads for vision width {vision_width}; pass "
                             "a config with vision.num_attention_heads (or vision_heads)")
        vals["vision_heads"] = _KNOWN_VISION_HEADS[vision_width]
    if "num_heads" not in vals:
        if hidden not in _KNOWN_BERT_HEADS:
            raise ModelError(f"cannot tell the joint encoder's attention heads for hidden size {hidden}; pass "
                             "a config with bert.num_attention_heads (or num_heads)")
        vals["num_heads"] = _KNOWN_BERT_HEADS[hidden]
    return FullJointConfig.from_dict(vals)


# ---------------------------------------------------------------- mapping and strict load
def _dedupe(edje: dict[str, torch.Tensor], canonical: str, copies: tuple[str, ...],
            problems: list[str]) -> dict[str, torch.Tensor]:
    present = [k for k in (canonical, *copies) if k in edje]
    if not present:
        return edje
    out = {k: v for k, v in edje.items() if k not in copies}
    ref = edje[present[0]]
    out[canonical] = ref
    for k in present[1:]:
        if edje[k].shape != ref.shape or not torch.equal(edje[k], ref):
            problems.append(f"tied copy {k} differs from {present[0]}")
    return out


def official_to_reranker_state(edje: dict[str, torch.Tensor], model: FullJointReranker) -> dict[str, torch.Tensor]:
    """Map official EDJE keys onto ``model``'s keys; raise ``CheckpointKeyError`` listing every problem."""
    problems: list[str] = []
    sd = _dedupe(edje, _WORD_EMB, _WORD_EMB_COPIES, problems)
    sd = _dedupe(sd, _MLM_BIAS, _MLM_BIAS_COPIES, problems)
    want = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    for key, t in sd.items():
        if key.startswith(_SKIPPED_PREFIXES):
            continue
        new = next((new + key[len(old):] for old, new in _RENAMES if key.startswith(old)), None)
        if new is None:
            unexpected.append(key)
            continue
        if new.startswith("mlm.") and model.mlm is None:
            continue  # MLM head not asked for: unused by the score
        mapped[new], origin[new] = t, key
    if model.mlm is not None and "mlm.predictions.bias" in mapped:
        mapped["mlm.predictions.decoder.weight"] = mapped.get("bert.embeddings.word_embeddings.weight",
                                                              torch.empty(0))
        mapped["mlm.predictions.decoder.bias"] = mapped["mlm.predictions.bias"]
    unexpected += [origin[k] for k in mapped if k not in want]
    missing = [k for k in want if k not in mapped]
    shapes = [f"{origin.get(k, k)}: checkpoint {list(t.shape)} vs model {list(want[k].shape)}"
              for k, t in mapped.items() if k in want and t.shape != want[k].shape]
    if missing:
        problems.append(f"missing keys (model names) {missing}")
    if unexpected:
        problems.append(f"unexpected keys {sorted(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {shapes}")
    if problems:
        raise CheckpointKeyError("checkpoint does not match the EDJE reranker: " + "; ".join(problems))
    return {k: mapped[k] for k in want}


def load_official_reranker(source: str | Path | dict[str, torch.Tensor], config: dict[str, Any] | None = None,
                           mlm_head: bool = False, revision: str | None = None
                           ) -> tuple[FullJointReranker, OfficialCheckpoint]:
    """Build a ``FullJointReranker`` from an official checkpoint (path, hub id or state dict), strictly."""
    if isinstance(source, dict):
        state, where = _unwrap(source, "state dict"), "state dict"
    else:
        state, where = read_state_dict(source, revision)
    ckpt = split_official(state, where)
    cfg = reranker_config_from_official(ckpt.edje, config, mlm_head)
    model = FullJointReranker(cfg)
    try:
        sd = official_to_reranker_state(ckpt.edje, model)
    except CheckpointKeyError as exc:
        raise CheckpointKeyError(f"{where}: {exc}") from exc
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    ckpt.skipped = sorted(k for k in ckpt.edje if k.startswith(_SKIPPED_PREFIXES))
    log.info("loaded official EDJE reranker from %s (%d SigLIP vision, %d dual-encoder keys set aside)",
             where, len(ckpt.vision_encoder), len(ckpt.clip))
    return model.eval(), ckpt


def reranker_to_official_state(model: FullJointReranker, text_projection_dim: int | None = None
                               ) -> dict[str, torch.Tensor]:
    """Inverse mapping: our reranker -> official key names, with the tied copies written out (for export/tests).

    ``text_projection_dim`` adds a random ``text_projection`` (unused by the score) as real checkpoints have.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        old = next(o + key[len(n):] for o, n in _RENAMES if key.startswith(n))
        out[old] = t.detach().clone()
    word = out[_WORD_EMB]
    for k in _WORD_EMB_COPIES:
        if k.startswith("text_") or model.mlm is not None:
            out[k] = word.clone()
    if text_projection_dim:
        h = model.config.hidden_size
        out["text_projection.weight"] = torch.randn(text_projection_dim, h) * 0.02
        out["text_projection.bias"] = torch.zeros(text_projection_dim)
    return out


# ---------------------------------------------------------------- compact format
def save_compact(model: FullJointReranker, dst_dir: str | Path, preset: str, fp16: bool = False,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write a model folder (``model_dir`` format) holding this reranker (adapter, joint encoder, head); the
    towers come from ``preset``."""
    cfg = {**model.to_config(), "mlm_head": False}
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mlm.")}
    config = {"preset": preset, "dtype": str(dtype).split(".")[-1], "reranker": cfg, **(extra or {})}
    return model_dir.write(Path(dst_dir), config, {"reranker": state}, dtype=dtype)


def convert_official(src: str | Path, dst_dir: str | Path, fp16: bool = False,
                     preset: str = "siglip2-l16-384-edje", config: dict[str, Any] | None = None) -> Path:
    """Official checkpoint -> compact directory loadable by ``load_model(dst_dir)`` (towers from ``preset``)."""
    model, ckpt = load_official_reranker(src, config)
    return save_compact(model, dst_dir, preset, fp16, extra={CONVERTED_FROM: ckpt.source})
