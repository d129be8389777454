"""EDJE reranker training over cached DINOv2 tokens, on top of a trained first stage.

Per step a batch of B training images with one caption each is drawn. The first stage's similarity S [B, B]
mines hard negatives inside the batch (excluding the same image and textually identical captions). Losses:

* ITM, listwise: softmax cross-entropy over [positive, k hard negatives] per caption (images) and per image
  (captions). With ``residual=True`` the trained score is ``alpha * S + edje_logit`` where ``alpha`` is the first
  stage's logit scale and the head's last layer starts at zero, so step 0 ranks exactly like the first stage and
  training only learns a correction (retrieval fuses with weight ``alpha`` the same way).
* MLM on the caption (``mlm_prob`` of the words masked), conditioned on the positive image tokens.
* Text-embedding recovery: joint encoder [CLS] of the caption alone, projected, pulled to the first-stage text
  embedding by 1 - cosine.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edje_qdrant.errors import InputError, ModelError
from edje_qdrant.models.flickr8k_preset import init_from_minilm, reranker_config
from edje_qdrant.models.reranker import EdjeReranker, RerankerConfig
from edje_qdrant.train import checkpoint as ckpt
from edje_qdrant.train.common import autocast, cosine_lr, pick_device, use_bf16
from edje_qdrant.train.data import CaptionSet, caption_set
from edje_qdrant.train.losses import (listwise_itm_loss, mask_tokens, mine_hard_negatives, mlm_loss,
                                      negative_mask, text_recovery_loss)

log = logging.getLogger(__name__)
WEIGHTS = "reranker.safetensors"
CONFIG = "reranker.json"


@dataclass
class EdjeTrainOptions:
    """Knobs of reranker training (defaults = what the offline preset used)."""

    steps: int = 250
    batch_size: int = 16
    negatives_t2i: int = 3
    negatives_i2t: int = 3
    lr: float = 5e-5
    adapter_lr: float = 3e-4
    head_lr: float = 1e-3
    warmup: int = 20
    residual: bool = True
    mlm_weight: float = 0.5
    mlm_prob: float = 0.5
    mlm_fraction: float = 0.25  # share of the batch's captions that also get an MLM pass
    recovery_weight: float = 0.5
    adapter_hidden: int = 1536
    num_tokens: int = 64
    checkpoint_every: int = 25
    seed: int = 0
    time_limit_s: float | None = None  # stop cleanly (checkpoint + weights) after this many seconds of this run


@torch.no_grad()
def init_adapter_queries(model: EdjeReranker, patches: torch.Tensor, seed: int = 0) -> None:
    """Set the m learned queries to key-projected real patch tokens so attention starts non-uniform.

    With tiny random queries every query attends uniformly and all m outputs are equal (no gradient signal).
    """
    g = torch.Generator().manual_seed(seed)
    flat = patches.reshape(-1, patches.shape[-1]).float()
    pick = torch.randperm(flat.shape[0], generator=g)[: model.num_tokens]
    model.adapter.query.copy_(model.adapter.key(flat[pick]).unsqueeze(0))


def trainable_reranker_state(model: EdjeReranker) -> dict[str, torch.Tensor]:
    """Reranker weights that training changes (no MLM head, no frozen word embeddings)."""
    frozen = {"bert.embeddings.word_embeddings.weight"}
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("mlm.") and k not in frozen}


class EdjeTrainer(nn.Module):
    """Reranker + training-only heads (text-recovery projection); computes the losses of one batch."""

    def __init__(self, reranker: EdjeReranker, clip_dim: int, alpha: float, opts: EdjeTrainOptions) -> None:
        super().__init__()
        self.reranker = reranker
        self.recover = nn.Linear(reranker.hidden_size, clip_dim)
        self.alpha = float(alpha)
        self.opts = opts
        reranker.bert.embeddings.word_embeddings.weight.requires_grad_(False)

    def losses(self, captions: list[str], caption_image: torch.Tensor, image_ids: torch.Tensor,
               image_captions: list[set[str]], patches: torch.Tensor, fs_text: torch.Tensor,
               fs_image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of a batch: captions [C] (caption c belongs to batch image ``caption_image[c]``), patch
        tokens of the batch images [I, n, D], first-stage embeddings of captions [C, e] and images [I, e]."""
        r = self.reranker
        o = self.opts
        dev = r.device
        sim = (fs_text @ fs_image.t()).float()  # [C, I]
        allowed = negative_mask(image_ids[caption_image], image_ids, captions, image_captions)
        neg_t2i = mine_hard_negatives(sim, allowed, o.negatives_t2i)  # [C, k] image columns
        # image -> text: for image i, its caption is the one with caption_image == i (first one)
        pos_caption = torch.full((len(image_ids),), -1, dtype=torch.long)
        for c, i in enumerate(caption_image.tolist()):
            if pos_caption[i] < 0:
                pos_caption[i] = c
        if bool((pos_caption < 0).any()):
            raise InputError("every batch image needs one caption")
        neg_i2t = mine_hard_negatives(sim.t(), allowed.t(), o.negatives_i2t)  # [I, k] caption rows
        pairs: dict[tuple[int, int], int] = {}

        def pid(c: int, i: int) -> int:
            return pairs.setdefault((c, i), len(pairs))

        t2i_idx = [[pid(c, int(caption_image[c]))] + [pid(c, int(j)) for j in neg_t2i[c]]
                   for c in range(len(captions))]
        i2t_idx = [[pid(int(pos_caption[i]), i)] + [pid(int(c), i) for c in neg_i2t[i]]
                   for i in range(len(image_ids))]
        pc = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        pi = torch.tensor([p[1] for p in pairs], dtype=torch.long)

        tokens = r.compress(patches.to(dev))  # [I, m, d]
        enc = r.tokenize(captions)
        logits = r(enc.input_ids[pc], enc.token_type_ids[pc], enc.attention_mask[pc], tokens[pi])
        score = logits.float()
        if o.residual:
            score = score + self.alpha * sim[pc, pi].to(dev)
        out: dict[str, torch.Tensor] = {}
        out["itm_t2i"] = listwise_itm_loss(score[torch.tensor(t2i_idx, device=dev)])
        out["itm_i2t"] = listwise_itm_loss(score[torch.tensor(i2t_idx, device=dev)])
        with torch.no_grad():
            out["acc_t2i"] = (score[torch.tensor(t2i_idx, device=dev)].argmax(1) == 0).float().mean()
        if o.mlm_weight > 0 and r.mlm is not None:
            n = max(1, int(round(o.mlm_fraction * len(captions))))
            ids = enc.input_ids[:n].cpu()
            special = (enc.token_type_ids[:n].cpu() == 1) | (enc.attention_mask[:n].cpu() == 0)
            special |= (ids == 101) | (ids == 102)
            masked, labels = mask_tokens(ids, special, 103, o.mlm_prob, generator)
            hidden = r.encode(masked.to(dev), enc.token_type_ids[:n], enc.attention_mask[:n],
                              tokens[caption_image[:n].to(dev)])
            out["mlm"] = mlm_loss(r.mlm(hidden), labels.to(dev))
        if o.recovery_weight > 0:
            t = r.tokenizer.backend
            single = [e.ids[: e.type_ids.index(1) if 1 in e.type_ids else len(e.ids)]
                      for e in t.encode_batch([(r.tokenizer.escape(c), "<image>") for c in captions])]
            width = max(len(s) for s in single)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in single], device=dev)
            mask = (torch.arange(width, device=dev).view(1, -1) < torch.tensor([len(s) for s in single],
                                                                              device=dev).view(-1, 1)).long()
            h = r.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            out["recovery"] = text_recovery_loss(self.recover(h[:, 0].float()), fs_text.to(dev))
        return out

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.opts
        loss = parts["itm_t2i"] + parts["itm_i2t"]
        if "mlm" in parts:
            loss = loss + o.mlm_weight * parts["mlm"]
        if "recovery" in parts:
            loss = loss + o.recovery_weight * parts["recovery"]
        return loss


def _param_groups(trainer: EdjeTrainer, o: EdjeTrainOptions) -> list[dict[str, Any]]:
    groups: dict[str, list[nn.Parameter]] = {"adapter": [], "head": [], "body": []}
    for name, p in trainer.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("reranker.adapter."):
            groups["adapter"].append(p)
        elif name.startswith(("reranker.head.", "recover.", "reranker.mlm.")):
            groups["head"].append(p)
        else:
            groups["body"].append(p)
    lrs = {"adapter": o.adapter_lr, "head": o.head_lr, "body": o.lr}
    return [{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def train_edje(data: CaptionSet, patches_of: Any, fs_text: torch.Tensor, fs_image: torch.Tensor, alpha: float,
               out: str | Path, opts: EdjeTrainOptions | None = None, *, device: str | None = None,
               precision: str = "auto", resume: bool = False, progress: bool = True,
               reranker: EdjeReranker | None = None) -> dict[str, Any]:
    """Train the reranker on ``data`` (train split). ``patches_of(image_indices) -> [B, n, D]`` gives vision
    tokens; ``fs_text`` [C, e] / ``fs_image`` [I, e] are first-stage embeddings of its captions / images.

    Checkpoints to ``out/reranker.ckpt`` every ``opts.checkpoint_every`` steps; ``resume`` continues it.
    Writes ``out/reranker.safetensors`` (trained weights only) and ``out/reranker.json``.
    """
    from safetensors.torch import save_file

    o = opts or EdjeTrainOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    bf16 = use_bf16(dev, precision)
    torch.manual_seed(o.seed)
    random.seed(o.seed)
    np.random.seed(o.seed)
    if reranker is None:
        reranker = EdjeReranker(reranker_config(o.num_tokens, o.adapter_hidden, mlm_head=o.mlm_weight > 0))
        init_from_minilm(reranker)
        sample = patches_of(list(range(min(32, len(data.images)))))
        init_adapter_queries(reranker, sample, o.seed)
    trainer = EdjeTrainer(reranker, fs_text.shape[1], alpha, o).to(dev)
    opt = torch.optim.AdamW(_param_groups(trainer, o), weight_decay=0.01)
    per_image: list[list[int]] = [[] for _ in data.images]
    for c, i in enumerate(data.caption_image):
        per_image[i].append(c)
    caption_sets = [{data.captions[c] for c in cs} for cs in per_image]
    step = 0
    ck_path = out / "reranker.ckpt"
    history: list[dict[str, float]] = []
    if resume and ck_path.is_file():
        state = ckpt.load_checkpoint(ck_path)
        missing, unexpected = trainer.load_state_dict(state["model"], strict=False)
        if unexpected:
            raise ModelError(f"{ck_path}: unexpected keys {unexpected}; it belongs to another configuration")
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        ckpt.set_rng_state(state["rng"])
        history = json.loads(state["extra"].get("history", "[]")) if isinstance(state["extra"], dict) else []
        log.info("resumed reranker training at step %d", step)

    def save() -> None:
        sd = {k: v.detach().clone() for k, v in trainer.state_dict().items()
              if k not in ("reranker.bert.embeddings.word_embeddings.weight",
                           "reranker.mlm.predictions.decoder.weight")}
        ckpt.save_checkpoint(ck_path, model=sd, optimizer=opt.state_dict(), step=step, epoch=0,
                             extra={"history": json.dumps(history[-200:])})

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=o.steps, initial=step, desc="EDJE reranker", unit="step")
    g = torch.Generator().manual_seed(o.seed + 17)
    t0 = time.time()
    n_img = len(data.images)
    while step < o.steps:
        if o.time_limit_s is not None and time.time() - t0 > o.time_limit_s:
            log.info("time limit reached at step %d; resume later with resume=True", step)
            save()
            break
        gstep = torch.Generator().manual_seed(o.seed * 100003 + step)
        img = torch.randperm(n_img, generator=gstep)[: o.batch_size]
        caps_idx = [per_image[int(i)][int(torch.randint(len(per_image[int(i)]), (1,), generator=gstep))]
                    for i in img]
        captions = [data.captions[c] for c in caps_idx]
        mult = cosine_lr(step, o.steps, o.warmup)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mult
        trainer.train()
        with autocast(dev, bf16):
            parts = trainer.losses(captions, torch.arange(len(img)), img, [caption_sets[int(i)] for i in img],
                                   patches_of(img.tolist()).float(), fs_text[caps_idx].to(dev),
                                   fs_image[img].to(dev), generator=g)
            loss = trainer.total(parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
        opt.step()
        step += 1
        history.append({k: round(float(v.detach()), 4) for k, v in parts.items()} | {"step": step})
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in parts.items()})
        if step % o.checkpoint_every == 0 or step == o.steps:
            save()
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    save_file({k: v.contiguous() for k, v in trainable_reranker_state(reranker).items()}, str(out / WEIGHTS))
    config = {"options": asdict(o), "alpha": alpha, "steps": step, "finished": step >= o.steps, "train_seconds_this_run": round(elapsed, 1),
              "reranker": reranker_config(o.num_tokens, o.adapter_hidden).to_dict(),
              "last_losses": history[-20:]}
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return config
