"""The split reranker end to end from a captions file: DINOv2 view caches, cross-fitted first stages, held-out
candidates, then ``split_reranker.train_split_reranker``."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from edje_qdrant.errors import ModelError
from edje_qdrant.models import model_dir
from edje_qdrant.models.flickr8k_preset import NAME, PRESET_DIR
from edje_qdrant.models.registry import load_model
from edje_qdrant.train.common import default_cache_folder, pick_device, use_bf16
from edje_qdrant.train.crossfit import HeldOutScores, heldout_scores, train_crossfit
from edje_qdrant.train.data import CaptionSet, caption_set, read_captions
from edje_qdrant.train.first_stage import global_features
from edje_qdrant.train.first_stage_embeddings import TextOnly, encode_texts
from edje_qdrant.train.split_reranker import SplitTrainOptions, train_split_reranker
from edje_qdrant.train.token_cache import TokenCache, build_view_caches, view_folder


def split_options(options: dict[str, Any] | None) -> SplitTrainOptions:
    """``SplitTrainOptions`` from ``--set`` style overrides; unknown names fail before any work starts."""
    known = {f.name for f in dataclasses.fields(SplitTrainOptions)}
    unknown = sorted(set(options or {}) - known)
    if unknown:
        raise ModelError(f"unknown split reranker options {unknown}; known: {sorted(known)}")
    return SplitTrainOptions(**(options or {}))


def train_split(captions: str | Path, images: str | Path, out: str | Path, options: dict[str, Any] | None = None,
                *, token_root: str | Path | None = None, folds: int = 2, candidates: str = "crossfit",
                device: str | None = None, precision: str = "auto", resume: bool = False,
                progress: bool = True, run_name: str = "split") -> dict[str, Any]:
    """The split reranker end to end: DINOv2 token caches (both views, the option's layers), cross-fitted first
    stages (the shipped preset's first-stage recipe) in ``out/crossfit``, then training into ``out/<run_name>``.
    ``candidates="production"`` takes candidates and residual scores from the shipped first stage instead."""
    opts = split_options(options)
    out, dev = Path(out), pick_device(device)
    bf16 = use_bf16(dev, precision)
    rows = read_captions(captions)
    names = sorted({r["image"] for r in rows if r["split"] in ("train", "dev")})
    root = Path(token_root) if token_root else default_cache_folder(images).with_name(
        default_cache_folder(images).name + "-views")
    dinov2_views = ("orig", "flip") if "flip" in opts.views else ("orig",)  # recolour reuses orig's DINOv2 tokens
    build_view_caches(images, names, root, layers=tuple(sorted(set(opts.layers) | {12})), views=dinov2_views,
                      device=str(dev), bf16=bf16, progress=progress)
    last = view_folder(root, "orig", 12)
    recipe = model_dir.read_config(PRESET_DIR)["first_stage"]
    train_crossfit(captions, images, out / "crossfit", folds=folds, cache=last, epochs=recipe["epochs"],
                   batch_size=recipe["batch_size"], lr=recipe["lr"], head_lr=recipe["head_lr"],
                   train_layers=recipe["train_layers"], clip_dim=recipe["clip_dim"], progress=progress)
    train = caption_set(rows, "train")
    names_c, feats = global_features(TokenCache(last), last)
    index = {n: i for i, n in enumerate(names_c)}
    train_feats = feats[[index[n] for n in train.images]]
    held = held_out_candidates(candidates, out / "crossfit", train, train_feats, dev, bf16)
    shipped_parts = model_dir.read_weights(model_dir.weights_file(PRESET_DIR))  # first-stage heads: adapter init
    heads = (shipped_parts["vision"]["head.proj.weight"].float(), shipped_parts["text"]["proj.weight"].float())
    return train_split_reranker(train, root, train.images, held, out / run_name, opts, dev, bf16, resume=resume,
                                progress=progress, first_stage_heads=heads, images_dir=images,
                                crossfit_dir=out / "crossfit")


def held_out_candidates(candidates: str, crossfit_dir: Path, train: CaptionSet, train_feats: torch.Tensor,
                        device: torch.device, bf16: bool) -> HeldOutScores:
    """Where candidates and residual scores come from: ``"crossfit"`` (fold models that never saw the image) or
    ``"production"`` (the shipped first stage, one fold)."""
    if candidates == "crossfit":
        return heldout_scores(crossfit_dir, train, train_feats, device, bf16)
    if candidates != "production":
        raise ModelError(f"candidates must be 'crossfit' or 'production', got {candidates!r}")
    shipped = load_model(NAME, device=str(device), precision="fp32")
    with torch.inference_mode():
        img = shipped.vision.head(train_feats.to(device)).float().cpu()
        txt = encode_texts(TextOnly(shipped.text), train.captions, device, bf16)
    return HeldOutScores(txt, img, torch.zeros(len(train.images), dtype=torch.long),
                         torch.tensor([shipped.fusion_weight]))
