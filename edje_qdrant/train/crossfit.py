"""Cross-fitted first stages: the training images split into folds, one first stage trained without each fold,
so every training caption and image gets first-stage embeddings from a model that never saw it.

Reranker training reads its candidates and residual scores from these held-out embeddings: they carry the
errors the production first stage makes on unseen queries, unlike the production model's own training split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edje_qdrant.errors import InputError
from edje_qdrant.train.data import CaptionSet, read_captions
from edje_qdrant.train.first_stage import CONFIG, WEIGHTS, train_first_stage
from edje_qdrant.train.first_stage_embeddings import encode_texts, load_first_stage

log = logging.getLogger(__name__)
HELDOUT = "heldout"


def fold_of_images(images: list[str], folds: int, seed: int = 0) -> dict[str, int]:
    """Image name -> fold (0..folds-1), a seeded shuffle dealt round-robin (folds differ by at most one)."""
    if folds < 2:
        raise InputError(f"cross-fitting needs at least 2 folds, got {folds}")
    order = sorted(images)
    random.Random(seed).shuffle(order)
    return {name: i % folds for i, name in enumerate(order)}


def _write_fold_captions(rows: list[dict[str, str]], fold_of: dict[str, int], fold: int, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["image\tcaption_idx\tsplit\tcaption"]
    for r in rows:
        if r["split"] == "train":
            split = HELDOUT if fold_of[r["image"]] == fold else "train"
            lines.append("\t".join([r["image"], r.get("caption_idx") or "", split, r["caption"]]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def train_crossfit(captions: str | Path, images: str | Path, out: str | Path, *, folds: int = 2, seed: int = 0,
                   cache: str | Path | None = None, progress: bool = True, **first_stage_kwargs: Any
                   ) -> list[dict[str, Any]]:
    """Train ``folds`` first stages into ``out/fold{f}`` (each without fold f, evaluated on it); folds already
    trained are kept, so an interrupted run resumes. Returns each fold's config (held-out recall included)."""
    out = Path(out)
    rows = read_captions(captions)
    fold_of = fold_of_images(sorted({r["image"] for r in rows if r["split"] == "train"}), folds, seed)
    configs = []
    for f in range(folds):
        d = out / f"fold{f}"
        if (d / WEIGHTS).is_file() and (d / CONFIG).is_file():
            configs.append(json.loads((d / CONFIG).read_text()))
            continue
        tsv = d / "captions.tsv"
        _write_fold_captions(rows, fold_of, f, tsv)
        log.info("cross-fit first stage %d/%d", f + 1, folds)
        configs.append(train_first_stage(tsv, images, d, cache=cache, eval_split=HELDOUT, seed=seed + f,
                                            progress=progress, **first_stage_kwargs))
    (out / "folds.json").write_text(json.dumps({"folds": folds, "seed": seed}, indent=2))
    return configs


@dataclass
class HeldOutScores:
    """First-stage embeddings of every training caption/image from the fold model that did not see it."""

    caption_emb: torch.Tensor  # [C, clip_dim]
    image_emb: torch.Tensor  # [I, clip_dim]
    image_fold: torch.Tensor  # [I] fold of each image; a caption's fold is its image's
    scale: torch.Tensor  # [folds] each fold model's logit scale

    def logits(self, caption: torch.Tensor, image: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
        """scale x cosine for caption/image index tensors of one shape (same-fold pairs only are meaningful)."""
        cos = (self.caption_emb[caption] * self.image_emb[image]).sum(-1)
        return self.scale[self.image_fold[caption_image[caption]]] * cos


@torch.no_grad()
def heldout_scores(out: str | Path, data: CaptionSet, global_feats: torch.Tensor, device: torch.device,
                   bf16: bool) -> HeldOutScores:
    """Held-out embeddings of ``data`` (the train split) from the fold models in ``out`` (memoised there)."""
    out = Path(out)
    memo = out / "heldout.safetensors"
    meta = json.loads((out / "folds.json").read_text())
    fold_of = fold_of_images(data.images, meta["folds"], meta["seed"])
    image_fold = torch.tensor([fold_of[n] for n in data.images])
    if memo.is_file():
        t = load_file(str(memo))
        if t["image_emb"].shape[0] == len(data.images) and t["caption_emb"].shape[0] == len(data.captions):
            return HeldOutScores(t["caption_emb"], t["image_emb"], image_fold, t["scale"])
    cap_img = torch.tensor(data.caption_image)
    caption_emb = torch.zeros(len(data.captions), 0)
    image_emb = torch.zeros(len(data.images), 0)
    scales = []
    for f in range(meta["folds"]):
        model, cfg = load_first_stage(out / f"fold{f}")
        scales.append(float(cfg["logit_scale"]))
        imgs = (image_fold == f).nonzero().flatten()
        caps = (image_fold[cap_img] == f).nonzero().flatten()
        ie = model.image(global_feats[imgs].to(device)).float().cpu()
        ce = encode_texts(model, [data.captions[i] for i in caps.tolist()], device, bf16)
        if image_emb.shape[1] == 0:
            image_emb = torch.zeros(len(data.images), ie.shape[1])
            caption_emb = torch.zeros(len(data.captions), ce.shape[1])
        image_emb[imgs], caption_emb[caps] = ie, ce
    scale = torch.tensor(scales)
    save_file({"caption_emb": caption_emb, "image_emb": image_emb, "scale": scale}, str(memo))
    return HeldOutScores(caption_emb, image_emb, image_fold, scale)


@torch.no_grad()
def heldout_text_embeddings(out: str | Path, texts: list[str], folds: torch.Tensor, device: torch.device,
                            bf16: bool) -> torch.Tensor:
    """First-stage embeddings of extra texts (e.g. counterfeit captions), each from the fold model that did not
    see the image it describes (``folds[i]``); memoised in ``out`` under a key of the texts and folds."""
    out = Path(out)
    key = hashlib.sha256(("\n".join(texts) + "|" + ",".join(map(str, folds.tolist()))).encode()).hexdigest()
    memo = out / "heldout_extra_text.safetensors"
    if memo.is_file():
        with safe_open(str(memo), "pt") as fh:
            if (fh.metadata() or {}).get("key") == key:
                return fh.get_tensor("emb")
    emb = None
    for f in sorted(set(folds.tolist())):
        rows = (folds == f).nonzero().flatten()
        model, _ = load_first_stage(out / f"fold{f}")
        part = encode_texts(model, [texts[i] for i in rows.tolist()], device, bf16)
        if emb is None:
            emb = torch.zeros(len(texts), part.shape[1])
        emb[rows] = part
    emb = emb if emb is not None else torch.zeros(0, 0)
    save_file({"emb": emb.contiguous()}, str(memo), metadata={"key": key})
    return emb
