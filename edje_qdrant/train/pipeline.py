"""Glue of the two stages: first-stage embeddings for reranker training, and export of the preset folder."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from edje_qdrant.errors import ModelError
from edje_qdrant.train import first_stage as fs
from edje_qdrant.train.common import autocast, pick_device, use_bf16
from edje_qdrant.train.data import caption_set
from edje_qdrant.train.edje import EdjeTrainOptions, train_edje

log = logging.getLogger(__name__)


def load_first_stage(out: str | Path) -> tuple[fs.FirstStage, dict[str, Any]]:
    """The trained first stage written by ``train_first_stage`` into ``out``."""
    from safetensors.torch import load_file

    out = Path(out)
    cfg_path, w_path = out / fs.CONFIG, out / fs.WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise ModelError(f"{out} holds no trained first stage ({fs.WEIGHTS}); run train_first_stage "
                         "(--stage first) with the same --out first")
    cfg = json.loads(cfg_path.read_text())
    model = fs.FirstStage(cfg["clip_dim"], cfg["train_layers"])
    sd = load_file(str(w_path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ModelError(f"{w_path}: unexpected keys {unexpected}")
    model.eval()
    return model, cfg


@torch.no_grad()
def encode_texts(model: fs.FirstStage, texts: list[str], device: torch.device, bf16: bool,
                 batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    model.to(device).eval()
    chunks = []
    rng = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm
        rng = tqdm(rng, desc="first-stage text", unit="batch")
    with autocast(device, bf16):
        for i in rng:
            chunks.append(model.text.encode(texts[i:i + batch_size]).float().cpu())
    return torch.cat(chunks)


class LazyTextEmbeddings:
    """First-stage caption embeddings computed on first use and memoised (``emb[list_of_indices]``)."""

    def __init__(self, model: fs.FirstStage, texts: list[str], device: torch.device, bf16: bool) -> None:
        self.model, self.texts, self.device, self.bf16 = model, texts, device, bf16
        self.memo: dict[int, torch.Tensor] = {}
        self.shape = (len(texts), model.text.clip_dim)

    def __getitem__(self, idx: list[int]) -> torch.Tensor:
        todo = sorted({int(i) for i in idx if int(i) not in self.memo})
        if todo:
            emb = encode_texts(self.model, [self.texts[i] for i in todo], self.device, self.bf16)
            self.memo.update(zip(todo, emb))
        return torch.stack([self.memo[int(i)] for i in idx])


def all_text_embeddings(model: fs.FirstStage, texts: list[str], out: Path, device: torch.device, bf16: bool,
                        progress: bool) -> torch.Tensor:
    """First-stage embeddings of every caption, memoised in ``out`` next to the first-stage weights they
    come from (recomputed when those weights or the captions change)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    key = hashlib.sha256((out / fs.WEIGHTS).read_bytes())
    key.update("\n".join(texts).encode())
    path = out / "first_stage_text.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            same = (fh.metadata() or {}).get("key") == key.hexdigest()
        if same:
            return load_file(str(path))["emb"]
    emb = encode_texts(model, texts, device, bf16, progress=progress)
    save_file({"emb": emb.contiguous()}, str(path), metadata={"key": key.hexdigest()})
    return emb


def _check_options(options: dict[str, Any]) -> None:
    """Unknown names and values of the wrong type fail before any work starts."""
    fields = {f.name: f for f in dataclasses.fields(EdjeTrainOptions)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ModelError(f"unknown reranker training options {unknown}; known: {sorted(fields)}")
    defaults = EdjeTrainOptions()
    for key, value in options.items():
        want = type(getattr(defaults, key))
        if want is type(None):
            ok = value is None or isinstance(value, (int, float))
        elif want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, want)
        if not ok:
            raise ModelError(f"reranker training option {key}={value!r}: expected {want.__name__}")
    dataclasses.replace(defaults, **options)  # value checks (e.g. mining) of EdjeTrainOptions


def train_reranker(captions: str | Path, images: str | Path, out: str | Path, *, cache: str | Path | None = None,
                   steps: int = 250, batch_size: int = 16, negatives: int = 3, mlm_weight: float = 0.5,
                   recovery_weight: float = 0.5, residual: bool = True, num_tokens: int = 64,
                   device: str | None = None, precision: str = "auto", resume: bool = False,
                   progress: bool = True, **options: Any) -> dict[str, Any]:
    """Train the EDJE reranker on the train split, on top of the first stage already trained in ``out``.

    Writes ``out/reranker.safetensors`` + ``out/reranker.json``; resumable from ``out/reranker.ckpt``.
    Extra keyword ``options`` are ``EdjeTrainOptions`` fields (lr, adapter_lr, negatives_i2t, ...).
    """
    _check_options(options)
    out = Path(out)
    dev = pick_device(device)
    bf16 = use_bf16(dev, precision)
    rows, tc, folder = fs.prepare_cache(captions, images, cache, dev, progress)
    model, fs_cfg = load_first_stage(out)
    train = caption_set(rows, "train")
    names, feats = fs._global_features(tc, folder)
    index = {n: i for i, n in enumerate(names)}
    fs_text: Any = LazyTextEmbeddings(model, train.captions, dev, bf16)
    if options.get("mining") == "global":
        fs_text = all_text_embeddings(model, train.captions, out, dev, bf16, progress)
    with torch.no_grad():
        fs_image = model.image(feats[[index[n] for n in train.images]]).float()
    rows_of = [index[n] for n in train.images]

    def patches_of(idx: list[int]) -> torch.Tensor:
        names_b = [names[rows_of[i]] for i in idx]
        return tc.rows(names_b)[:, 1:]

    opts = EdjeTrainOptions(steps=steps, batch_size=batch_size, negatives_t2i=negatives,
                            negatives_i2t=options.pop("negatives_i2t", negatives), mlm_weight=mlm_weight,
                            recovery_weight=recovery_weight, residual=residual, num_tokens=num_tokens, **options)
    alpha = float(fs_cfg["logit_scale"]) if residual else 0.0
    return train_edje(train, patches_of, fs_text, fs_image, alpha, out, opts, device=str(dev),
                      precision="bf16" if bf16 else "fp32", resume=resume, progress=progress)


def export_preset(out: str | Path, preset_dir: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write the preset's model folder (``model_dir`` format, fp16, only trained weights) into ``preset_dir`` from
    a training folder ``out`` (first stage required, reranker optional: a missing reranker is exported at its
    initial state, which ranks exactly like the first stage)."""
    from safetensors.torch import load_file

    from edje_qdrant.models import model_dir
    from edje_qdrant.models.flickr8k_preset import NAME
    from edje_qdrant.models.full_joint import FullJointReranker, init_full_joint_from_minilm, minilm_full_joint_config

    out = Path(out)
    fs_cfg = json.loads((out / fs.CONFIG).read_text())
    r_path = out / "reranker.safetensors"
    if r_path.is_file():
        r_cfg = json.loads((out / "reranker.json").read_text())
        rsd = load_file(str(r_path))
        rconf = r_cfg["reranker"]
        residual = bool(r_cfg["options"]["residual"])
    else:
        rconf = minilm_full_joint_config().to_dict()
        model = FullJointReranker(minilm_full_joint_config())
        init_full_joint_from_minilm(model)
        rsd = model.trainable_state()
        residual = True
    config = {"preset": NAME, "clip_dim": fs_cfg["clip_dim"], "text_train_layers": fs_cfg["train_layers"],
              "reranker": {**rconf, "kind": "edje"},
              "fusion": {"first_stage_weight": float(fs_cfg["logit_scale"]) if residual else 0.0},
              "first_stage": dict(fs_cfg), "metrics": metrics or {}}
    return model_dir.write(Path(preset_dir), config, {**_first_stage_parts(out), "reranker": rsd})


def _first_stage_parts(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The trained first stage of a training folder as model-folder parts (text tower, vision head)."""
    from safetensors.torch import load_file

    parts: dict[str, dict[str, torch.Tensor]] = {"text": {}, "vision": {}}
    for key, t in load_file(str(out / fs.WEIGHTS)).items():
        if key.startswith("text."):
            parts["text"][key[len("text."):]] = t
        elif key.startswith("image."):
            parts["vision"]["head." + key[len("image."):]] = t
    return parts


def export_split_preset(run: str | Path, preset_dir: str | Path, first_stage_from: str | Path,
                        metrics: dict[str, Any] | None = None, version: int = 3) -> Path:
    """Write a model folder whose reranker is the split reranker trained in ``run`` and whose first stage
    (tuned text layers, LiT heads) is copied from the model folder ``first_stage_from``; the fusion weight is that
    folder's times the gain learned with the reranker (1 when it was not learned)."""
    from safetensors.torch import load_file

    from edje_qdrant.models import model_dir
    from edje_qdrant.train.split_reranker import CONFIG, WEIGHTS

    run, source = Path(run), Path(first_stage_from)
    src_cfg = model_dir.read_config(source)
    src_file = model_dir.weights_file(source)
    if src_file is None:
        raise ModelError(f"{source}: no weights file; pass the model folder whose first stage to keep")
    parts = model_dir.read_weights(src_file)
    parts["reranker"] = load_file(str(run / WEIGHTS))
    run_cfg = json.loads((run / CONFIG).read_text())
    config = {k: v for k, v in src_cfg.items() if k not in ("reranker", "metrics")}
    first_stage_weight = float(src_cfg.get("first_stage", {}).get("logit_scale",
                                                                  src_cfg["fusion"]["first_stage_weight"]))
    config["fusion"] = {"first_stage_weight": first_stage_weight * float(run_cfg.get("fusion_gain", 1.0))}
    config.update({"version": version, "reranker": {**run_cfg["reranker"], "kind": "split"},
                   "token_layers": list(run_cfg["options"]["layers"]),
                   "reranker_training": {k: run_cfg[k] for k in ("options", "steps", "best_step", "fusion_gain",
                                                                   "train_seconds", "pairs_per_second")
                                         if k in run_cfg},
                   "metrics": metrics or {}})
    return model_dir.write(Path(preset_dir), config, parts)


def train_split(captions: str | Path, images: str | Path, out: str | Path, options: dict[str, Any] | None = None,
                *, token_root: str | Path | None = None, folds: int = 2, candidates: str = "crossfit",
                device: str | None = None, precision: str = "auto", resume: bool = False,
                progress: bool = True, run_name: str = "split") -> dict[str, Any]:
    """The split reranker end to end: DINOv2 token caches (both views, the option's layers), cross-fitted first
    stages (the shipped preset's first-stage recipe) in ``out/crossfit``, then training into ``out/<run_name>``.
    ``candidates="production"`` takes candidates and residual scores from the shipped first stage instead."""
    from edje_qdrant.models import load_model
    from edje_qdrant.models import model_dir
    from edje_qdrant.models.flickr8k_preset import NAME, PRESET_DIR
    from edje_qdrant.train.crossfit import HeldOutScores, heldout_scores, train_crossfit
    from edje_qdrant.train.split_reranker import SplitTrainOptions, train_split_reranker
    from edje_qdrant.train.token_cache import build_view_caches, view_folder

    known = {f.name for f in dataclasses.fields(SplitTrainOptions)}
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise ModelError(f"unknown split reranker options {unknown}; known: {sorted(known)}")
    opts = SplitTrainOptions(**(options or {}))
    out, dev = Path(out), pick_device(device)
    bf16 = use_bf16(dev, precision)
    rows = fs.read_captions(captions)
    names = sorted({r["image"] for r in rows if r["split"] in ("train", "dev")})
    root = Path(token_root) if token_root else fs.default_cache_folder(images).with_name(
        fs.default_cache_folder(images).name + "-views")
    dinov2_views = ("orig", "flip") if "flip" in opts.views else ("orig",)  # recolour reuses orig's DINOv2 tokens
    build_view_caches(images, names, root, layers=tuple(sorted(set(opts.layers) | {12})), views=dinov2_views,
                      device=str(dev), bf16=bf16, progress=progress)
    last = view_folder(root, "orig", 12)
    recipe = model_dir.read_config(PRESET_DIR)["first_stage"]
    train_crossfit(captions, images, out / "crossfit", folds=folds, cache=last, epochs=recipe["epochs"],
                   batch_size=recipe["batch_size"], lr=recipe["lr"], head_lr=recipe["head_lr"],
                   train_layers=recipe["train_layers"], clip_dim=recipe["clip_dim"], progress=progress)
    train = caption_set(rows, "train")
    names_c, feats = fs._global_features(fs.TokenCache(last), last)
    index = {n: i for i, n in enumerate(names_c)}
    train_feats = feats[[index[n] for n in train.images]]
    if candidates == "crossfit":
        held = heldout_scores(out / "crossfit", train, train_feats, dev, bf16)
    elif candidates == "production":
        shipped = load_model(NAME, device=str(dev), precision="fp32")
        with torch.inference_mode():
            img = shipped.vision.head(train_feats.to(dev)).float().cpu()
            txt = encode_texts(_TextOnly(shipped.text), train.captions, dev, bf16)
        held = HeldOutScores(txt, img, torch.zeros(len(train.images), dtype=torch.long),
                             torch.tensor([shipped.fusion_weight]))
    else:
        raise ModelError(f"candidates must be 'crossfit' or 'production', got {candidates!r}")
    shipped_parts = model_dir.read_weights(model_dir.weights_file(PRESET_DIR))  # first-stage heads: adapter init
    heads = (shipped_parts["vision"]["head.proj.weight"].float(), shipped_parts["text"]["proj.weight"].float())
    return train_split_reranker(train, root, train.images, held, out / run_name, opts, dev, bf16, resume=resume,
                                progress=progress, first_stage_heads=heads, images_dir=images,
                                crossfit_dir=out / "crossfit")


class _TextOnly(torch.nn.Module):
    """Wraps a text tower so ``encode_texts`` (which reads ``model.text``) can embed with it."""

    def __init__(self, text: torch.nn.Module) -> None:
        super().__init__()
        self.text = text
