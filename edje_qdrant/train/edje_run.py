"""The EDJE reranker end to end from a captions file: token cache, the first stage trained in the same folder,
its embeddings, then ``edje.train_edje``."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from edje_qdrant.errors import ModelError
from edje_qdrant.train.common import pick_device, use_bf16
from edje_qdrant.train.data import caption_set
from edje_qdrant.train.edje import EdjeTrainOptions, train_edje
from edje_qdrant.train.first_stage import global_features, prepare_cache
from edje_qdrant.train.first_stage_embeddings import LazyTextEmbeddings, all_text_embeddings, load_first_stage


def check_edje_options(options: dict[str, Any]) -> None:
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
    check_edje_options(options)
    out = Path(out)
    dev = pick_device(device)
    bf16 = use_bf16(dev, precision)
    rows, token_cache, folder = prepare_cache(captions, images, cache, dev, progress)
    model, first_config = load_first_stage(out)
    train = caption_set(rows, "train")
    names, feats = global_features(token_cache, folder)
    index = {n: i for i, n in enumerate(names)}
    first_text: Any = LazyTextEmbeddings(model, train.captions, dev, bf16)
    if options.get("mining") == "global":
        first_text = all_text_embeddings(model, train.captions, out, dev, bf16, progress)
    with torch.no_grad():
        first_image = model.image(feats[[index[n] for n in train.images]]).float()
    rows_of = [index[n] for n in train.images]

    def patches_of(idx: list[int]) -> torch.Tensor:
        names_b = [names[rows_of[i]] for i in idx]
        return token_cache.rows(names_b)[:, 1:]

    opts = EdjeTrainOptions(steps=steps, batch_size=batch_size, negatives_t2i=negatives,
                            negatives_i2t=options.pop("negatives_i2t", negatives), mlm_weight=mlm_weight,
                            recovery_weight=recovery_weight, residual=residual, num_tokens=num_tokens, **options)
    alpha = float(first_config["logit_scale"]) if residual else 0.0
    return train_edje(train, patches_of, first_text, first_image, alpha, out, opts, device=str(dev),
                      precision="bf16" if bf16 else "fp32", resume=resume, progress=progress)
