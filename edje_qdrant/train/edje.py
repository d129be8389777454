"""EDJE reranker training over cached DINOv2 tokens, on top of a trained first stage.

Each step draws B training images with one caption each (the anchors). Hard negatives come from the first
stage's similarity, excluding the same image and textually identical captions, either inside the batch
(``mining="in_batch"``) or over the whole training split (``mining="global"``, the candidates a real query
re-ranks). Losses:

* ITM, listwise: softmax cross-entropy over [positive, k hard negatives] per caption (images) and per image
  (captions). With ``residual=True`` the trained score is ``alpha * S + edje_logit`` where ``alpha`` is the first
  stage's logit scale, so training learns a correction on top of the first stage (retrieval fuses with weight
  ``alpha`` the same way). ``head_init_std=0`` zeroes the head's last layer: step 0 then ranks exactly like the
  first stage, but the encoder gets no gradient until the head has grown.
* MLM on the caption (``mlm_prob`` of the words masked), conditioned on the positive image tokens.
* Text-embedding recovery: joint encoder [CLS] of the caption alone, projected, pulled to the first-stage text
  embedding by 1 - cosine.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edje_qdrant.errors import InputError, ModelError
from edje_qdrant.models.full_joint import FullJointReranker, init_full_joint_from_minilm, minilm_full_joint_config
from edje_qdrant.train import checkpoint as ckpt
from edje_qdrant.train.common import autocast, cosine_lr, pick_device, use_bf16
from edje_qdrant.train.data import CaptionSet
from edje_qdrant.train.losses import (listwise_itm_loss, mask_tokens, mlm_loss, negative_mask,
                                      sample_hard_negatives, text_recovery_loss)

log = logging.getLogger(__name__)
WEIGHTS = "reranker.safetensors"
CONFIG = "reranker.json"
MININGS = ("in_batch", "global")


@dataclass
class EdjeTrainOptions:
    """Knobs of reranker training (defaults = what the offline preset used)."""

    steps: int = 250
    batch_size: int = 16
    negatives_t2i: int = 3
    negatives_i2t: int = 3
    mining: str = "in_batch"  # where hard negatives come from: "in_batch" or "global" (whole training split)
    negative_pool: int = 0  # draw the k negatives from this many hardest (0: the hardest k)
    lr: float = 5e-5
    adapter_lr: float = 3e-4
    head_lr: float = 1e-3
    warmup: int = 20
    residual: bool = True
    head_init_std: float = 0.0
    mlm_weight: float = 0.5
    mlm_prob: float = 0.5
    mlm_fraction: float = 0.25  # share of the batch's captions that also get an MLM pass
    recovery_weight: float = 0.5
    adapter_hidden: int = 1536
    num_tokens: int = 64
    num_layers: int = 6
    adapter_init: str = "patch_keys"  # "patch_keys" (queries from real patch keys) or "prototypes"
    adapter_warmup_steps: int = 0  # first steps train only the adapter, image tokens alone -> caption embedding
    adapter_warmup_batch: int = 64
    checkpoint_every: int = 25
    seed: int = 0
    time_limit_s: float | None = None  # stop cleanly (checkpoint + weights) after this many seconds of this run

    def __post_init__(self) -> None:
        if self.adapter_init not in ("patch_keys", "prototypes"):
            raise InputError(f"adapter_init must be 'patch_keys' or 'prototypes', got {self.adapter_init!r}")
        if self.mining not in MININGS:
            raise InputError(f"mining must be one of {MININGS}, got {self.mining!r}")


@torch.no_grad()
def init_adapter_queries(model: FullJointReranker, patches: torch.Tensor, seed: int = 0) -> None:
    """Set the m learned queries to key-projected real patch tokens so attention starts non-uniform.

    With tiny random queries every query attends uniformly and all m outputs are equal (no gradient signal).
    """
    g = torch.Generator().manual_seed(seed)
    flat = patches.reshape(-1, patches.shape[-1]).float()
    pick = torch.randperm(flat.shape[0], generator=g)[: model.num_tokens]
    model.adapter.query.copy_(model.adapter.key(flat[pick]).unsqueeze(0))


@torch.no_grad()
def init_adapter_prototypes(model: FullJointReranker, patches: torch.Tensor, seed: int = 0,
                            sharpness: float = 2.0, out_norm: float = 1.0) -> None:
    """Start the adapter as soft clustering of centred patch tokens around m prototypes.

    DINOv2 patch tokens share a large common component, so a randomly initialised adapter emits m nearly equal
    tokens, nearly equal across images too, and training then collapses them to one constant token the encoder
    ignores (measured: within-image cosine 0.995, across images 0.99). Here keys/values are centred on the
    sample mean, the m queries are random centred patches, the attention projections are scaled identities
    (``sharpness`` sets how peaked attention starts), the MLP branch starts at zero and a random orthogonal-ish
    projection maps to the joint width with token norm ``out_norm`` (word-embedding scale): tokens differ across
    images (cosine ~0.26 between images at the same slot) and the encoder's [CLS] depends on the image.
    """
    a = model.adapter
    g = torch.Generator().manual_seed(seed)
    x = patches.reshape(-1, patches.shape[-1]).float()
    d = x.shape[1]
    mu = x.mean(0)
    xc = x - mu
    spread = xc.norm(dim=-1).mean()
    head_dim = d // a.attention.num_heads
    eye = torch.eye(d)
    a.key.weight.copy_(eye)
    a.key.bias.copy_(-mu)
    a.value.weight.copy_(eye)
    a.value.bias.copy_(-mu)
    q_scale = sharpness * head_dim ** 0.5 * a.attention.num_heads / spread ** 2
    a.attention.in_proj_weight.copy_(torch.cat([eye * q_scale, eye, eye]))
    a.attention.in_proj_bias.zero_()
    a.attention.out_proj.weight.copy_(eye)
    a.attention.out_proj.bias.zero_()
    pick = torch.randperm(x.shape[0], generator=g)[: model.num_tokens]
    a.query.copy_(xc[pick].unsqueeze(0))
    a.mlp.fc2.weight.zero_()
    a.mlp.fc2.bias.zero_()
    proj = torch.randn(a.projection.weight.shape, generator=g) / d ** 0.5
    a.projection.weight.copy_(proj * 3.0 * out_norm / spread)
    a.projection.bias.zero_()


@dataclass
class StepGroups:
    """One step's work: unique dataset captions/images and listwise groups over their positions.

    ``t2i`` rows are (caption position, [positive image position, negative image positions...]); ``i2t`` rows
    are (image position, [positive caption position, negatives...]); ``anchors`` are the positive pairs.
    """

    captions: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    t2i: list[tuple[int, list[int]]] = field(default_factory=list)
    i2t: list[tuple[int, list[int]]] = field(default_factory=list)
    anchors: list[tuple[int, int]] = field(default_factory=list)


def _norm(text: str) -> str:
    return text.strip().lower()


class NegativeMiner:
    """Builds ``StepGroups`` for anchor (image, caption) pairs from first-stage similarities."""

    def __init__(self, data: CaptionSet) -> None:
        self.data = data
        self.per_image: list[list[int]] = [[] for _ in data.images]
        self.same_text: dict[str, list[int]] = {}
        for c, i in enumerate(data.caption_image):
            self.per_image[i].append(c)
            self.same_text.setdefault(_norm(data.captions[c]), []).append(c)

    def in_batch(self, img: list[int], caps: list[int], fs_text: torch.Tensor, fs_image: torch.Tensor,
                 k_t2i: int, k_i2t: int, pool: int, g: torch.Generator | None = None) -> StepGroups:
        """Negatives among the batch's own images / captions; ``fs_*`` are the anchors' embeddings."""
        d = self.data
        ids = torch.tensor(img)
        sim = (fs_text @ fs_image.t()).float()
        allowed = negative_mask(ids, ids, [d.captions[c] for c in caps],
                                [{d.captions[c] for c in self.per_image[i]} for i in img])
        neg_t2i = sample_hard_negatives(sim, allowed, k_t2i, pool, g)
        neg_i2t = sample_hard_negatives(sim.t(), allowed.t(), k_i2t, pool, g)
        n = len(img)
        return StepGroups(captions=list(caps), images=list(img),
                          t2i=[(r, [r] + neg_t2i[r].tolist()) for r in range(n)],
                          i2t=[(r, [r] + neg_i2t[r].tolist()) for r in range(n)],
                          anchors=[(r, r) for r in range(n)])

    def global_(self, img: list[int], caps: list[int], fs_text_all: torch.Tensor, fs_image_all: torch.Tensor,
                k_t2i: int, k_i2t: int, pool: int, g: torch.Generator | None = None) -> StepGroups:
        """Negatives over the whole split: the images / captions the first stage ranks highest."""
        d = self.data
        s_t2i = (fs_text_all[caps] @ fs_image_all.t()).float()  # [B, I]
        ok_t2i = torch.ones_like(s_t2i, dtype=torch.bool)
        s_i2t = (fs_image_all[img] @ fs_text_all.t()).float()  # [B, C]
        ok_i2t = torch.ones_like(s_i2t, dtype=torch.bool)
        for r, (i, c) in enumerate(zip(img, caps)):
            ok_t2i[r, i] = False
            for twin in self.same_text[_norm(d.captions[c])]:
                ok_t2i[r, d.caption_image[twin]] = False
            for own in self.per_image[i]:
                ok_i2t[r, self.same_text[_norm(d.captions[own])]] = False
        neg_t2i = sample_hard_negatives(s_t2i, ok_t2i, k_t2i, pool, g).tolist()
        neg_i2t = sample_hard_negatives(s_i2t, ok_i2t, k_i2t, pool, g).tolist()
        groups = StepGroups()
        img_pos: dict[int, int] = {}
        cap_pos: dict[int, int] = {}

        def ip(i: int) -> int:
            if i not in img_pos:
                img_pos[i] = len(groups.images)
                groups.images.append(i)
            return img_pos[i]

        def cp(c: int) -> int:
            if c not in cap_pos:
                cap_pos[c] = len(groups.captions)
                groups.captions.append(c)
            return cap_pos[c]

        for r, (i, c) in enumerate(zip(img, caps)):
            groups.anchors.append((cp(c), ip(i)))
        for r, (i, c) in enumerate(zip(img, caps)):
            groups.t2i.append((cp(c), [ip(i)] + [ip(j) for j in neg_t2i[r]]))
            groups.i2t.append((ip(i), [cp(c)] + [cp(j) for j in neg_i2t[r]]))
        return groups


class EdjeTrainer(nn.Module):
    """Reranker + training-only heads (text-recovery projection); computes the losses of one step."""

    def __init__(self, reranker: FullJointReranker, clip_dim: int, alpha: float, opts: EdjeTrainOptions) -> None:
        super().__init__()
        self.reranker = reranker
        self.recover = nn.Linear(reranker.token_dim, clip_dim)
        self.image_proj = nn.Linear(reranker.token_dim, clip_dim)
        self.alpha = float(alpha)
        self.opts = opts
        reranker.bert.embeddings.word_embeddings.weight.requires_grad_(False)

    def losses(self, groups: StepGroups, captions: list[str], patches: torch.Tensor, fs_text: torch.Tensor,
               fs_image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one step: ``captions`` / ``patches`` [I, n, D] / first-stage embeddings ``fs_text``
        [C, e] and ``fs_image`` [I, e] are aligned with ``groups.captions`` / ``groups.images``."""
        r = self.reranker
        o = self.opts
        dev = r.device
        sim = (fs_text @ fs_image.t()).float()  # [C, I]
        pairs: dict[tuple[int, int], int] = {}

        def pid(c: int, i: int) -> int:
            return pairs.setdefault((c, i), len(pairs))

        t2i_idx = [[pid(c, i) for i in imgs] for c, imgs in groups.t2i]
        i2t_idx = [[pid(c, i) for c in caps] for i, caps in groups.i2t]
        pc = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        pi = torch.tensor([p[1] for p in pairs], dtype=torch.long)

        tokens = r.compress(patches.to(dev))  # [I, m, d]
        enc = r.tokenize(captions)
        logits = r(enc.input_ids[pc], enc.token_type_ids[pc], enc.attention_mask[pc], tokens[pi])
        score = logits.float()
        if o.residual:
            score = score + self.alpha * sim[pc, pi].to(dev)
        out: dict[str, torch.Tensor] = {}
        t2i = score[torch.tensor(t2i_idx, device=dev)]
        out["itm_t2i"] = listwise_itm_loss(t2i)
        out["itm_i2t"] = listwise_itm_loss(score[torch.tensor(i2t_idx, device=dev)])
        with torch.no_grad():
            out["acc_t2i"] = (t2i.argmax(1) == 0).float().mean()
        anchor_c = torch.tensor([c for c, _ in groups.anchors], dtype=torch.long)
        anchor_i = torch.tensor([i for _, i in groups.anchors], dtype=torch.long)
        if o.mlm_weight > 0 and r.mlm is not None:
            n = max(1, int(round(o.mlm_fraction * len(anchor_c))))
            rows = anchor_c[:n]
            ids = enc.input_ids[rows].cpu()
            special = (enc.token_type_ids[rows].cpu() == 1) | (enc.attention_mask[rows].cpu() == 0)
            special |= (ids == 101) | (ids == 102)
            masked, labels = mask_tokens(ids, special, 103, o.mlm_prob, generator)
            hidden = r.encode(masked.to(dev), enc.token_type_ids[rows], enc.attention_mask[rows],
                              tokens[anchor_i[:n].to(dev)])
            out["mlm"] = mlm_loss(r.mlm(hidden), labels.to(dev))
        if o.recovery_weight > 0:
            t = r.tokenizer.backend
            texts = [captions[int(c)] for c in anchor_c]
            single = [e.ids[: e.type_ids.index(1) if 1 in e.type_ids else len(e.ids)]
                      for e in t.encode_batch([(r.tokenizer.escape(c), "<image>") for c in texts])]
            width = max(len(s) for s in single)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in single], device=dev)
            mask = (torch.arange(width, device=dev).view(1, -1) < torch.tensor([len(s) for s in single],
                                                                              device=dev).view(-1, 1)).long()
            h = r.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            out["recovery"] = text_recovery_loss(self.recover(h[:, 0].float()), fs_text[anchor_c].to(dev))
        return out

    def adapter_warmup_losses(self, patches: torch.Tensor, fs_text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image tokens alone through the joint encoder, mean-pooled and projected, matched contrastively to the
        first-stage embedding of one caption per image (``fs_text`` [B, e]); teaches the adapter to write tokens
        the text encoder can read before ITM starts."""
        r = self.reranker
        dev = r.device
        tokens = r.compress(patches.to(dev))  # [B, m, d]
        b, m = tokens.shape[0], tokens.shape[1]
        ids = torch.tensor([101] + [r.config.image_token_id] * m + [102], device=dev).expand(b, -1)
        types = torch.ones_like(ids)
        types[:, 0] = 0
        hidden = r.encode(ids, types, torch.ones_like(ids), tokens)[:, 1:-1]
        emb = F.normalize(self.image_proj(hidden.float().mean(1)), dim=-1)
        target = F.normalize(fs_text.to(dev).float(), dim=-1)
        logits = max(self.alpha, 10.0) * emb @ target.t()
        labels = torch.arange(b, device=dev)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        return {"warmup_nce": loss, "warmup_acc": (logits.argmax(1) == labels).float().mean().detach()}

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.opts
        if "warmup_nce" in parts:
            return parts["warmup_nce"]
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
        elif name.startswith(("reranker.head.", "recover.", "image_proj.", "reranker.mlm.")):
            groups["head"].append(p)
        else:
            groups["body"].append(p)
    lrs = {"adapter": o.adapter_lr, "head": o.head_lr, "body": o.lr}
    return [{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def train_edje(data: CaptionSet, patches_of: Any, fs_text: torch.Tensor, fs_image: torch.Tensor, alpha: float,
               out: str | Path, opts: EdjeTrainOptions | None = None, *, device: str | None = None,
               precision: str = "auto", resume: bool = False, progress: bool = True,
               reranker: FullJointReranker | None = None) -> dict[str, Any]:
    """Train the reranker on ``data`` (train split). ``patches_of(image_indices) -> [B, n, D]`` gives vision
    tokens; ``fs_text`` [C, e] / ``fs_image`` [I, e] are first-stage embeddings of its captions / images.

    Checkpoints to ``out/reranker.ckpt`` every ``opts.checkpoint_every`` steps; ``resume`` continues it.
    Writes ``out/reranker.safetensors`` (trained weights only) and ``out/reranker.json``.
    """
    o = opts or EdjeTrainOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    bf16 = use_bf16(dev, precision)
    seed_everything(o.seed)
    if reranker is None:
        reranker = initial_reranker(o, patches_of(list(range(min(32, len(data.images))))))
    trainer = EdjeTrainer(reranker, fs_text.shape[1], alpha, o).to(dev)
    run = _Run(trainer, torch.optim.AdamW(_param_groups(trainer, o), weight_decay=0.01), out / "reranker.ckpt")
    if resume:
        run.resume()
    miner = NegativeMiner(data)
    if o.mining == "global" and not isinstance(fs_text, torch.Tensor):  # lazily computed embeddings
        fs_text = fs_text[list(range(len(data.captions)))]
    bar = _progress_bar(progress, o.steps, run.step)
    t0 = time.time()
    while run.step < o.steps:
        if o.time_limit_s is not None and time.time() - t0 > o.time_limit_s:
            log.info("time limit reached at step %d; resume later with resume=True", run.step)
            run.save()
            break
        parts = _train_step(run, miner, data, patches_of, fs_text, fs_image, o, dev, bf16)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in parts.items()})
        if run.step % o.checkpoint_every == 0 or run.step == o.steps:
            run.save()
    if bar is not None:
        bar.close()
    return _write_result(out, reranker, o, alpha, run, time.time() - t0)


def seed_everything(seed: int) -> None:
    """Seed torch, random and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def initial_reranker(o: EdjeTrainOptions, sample_patches: torch.Tensor) -> FullJointReranker:
    """MiniLM-initialised reranker with its adapter queries set from a sample of patch tokens."""
    reranker = FullJointReranker(minilm_full_joint_config(o.num_tokens, o.adapter_hidden,
                                                          mlm_head=o.mlm_weight > 0, num_layers=o.num_layers))
    init_full_joint_from_minilm(reranker)
    if o.adapter_init == "prototypes":
        init_adapter_prototypes(reranker, sample_patches, o.seed)
    else:
        init_adapter_queries(reranker, sample_patches, o.seed)
    if o.head_init_std > 0:
        with torch.no_grad():
            reranker.head[1].weight.normal_(0.0, o.head_init_std)
    return reranker


class _Run:
    """Trainer + optimizer + step count + loss history, and the checkpoint that resumes them."""

    _NOT_SAVED = ("reranker.bert.embeddings.word_embeddings.weight", "reranker.mlm.predictions.decoder.weight")

    def __init__(self, trainer: EdjeTrainer, opt: torch.optim.Optimizer, path: Path) -> None:
        self.trainer, self.opt, self.path = trainer, opt, path
        self.step = 0
        self.history: list[dict[str, float]] = []

    def resume(self) -> None:
        if not self.path.is_file():
            return
        state = ckpt.load_checkpoint(self.path)
        _, unexpected = self.trainer.load_state_dict(state["model"], strict=False)
        if unexpected:
            raise ModelError(f"{self.path}: unexpected keys {unexpected}; it belongs to another configuration")
        self.opt.load_state_dict(state["optimizer"])
        self.step = state["step"]
        ckpt.set_rng_state(state["rng"])
        extra = state["extra"]
        self.history = json.loads(extra.get("history", "[]")) if isinstance(extra, dict) else []
        log.info("resumed reranker training at step %d", self.step)

    def save(self) -> None:
        sd = {k: v.detach().clone() for k, v in self.trainer.state_dict().items() if k not in self._NOT_SAVED}
        ckpt.save_checkpoint(self.path, model=sd, optimizer=self.opt.state_dict(), step=self.step, epoch=0,
                             extra={"history": json.dumps(self.history[-200:])})


def _progress_bar(progress: bool, total: int, initial: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="EDJE reranker", unit="step")


def _step_groups(miner: NegativeMiner, data: CaptionSet, fs_text: torch.Tensor, fs_image: torch.Tensor,
                 o: EdjeTrainOptions, step: int, warming: bool) -> StepGroups:
    """This step's anchors (images + one caption each) and their hard negatives; a function of the step only."""
    gstep = torch.Generator().manual_seed(o.seed * 100003 + step)
    img = torch.randperm(len(data.images), generator=gstep)[: o.adapter_warmup_batch if warming else o.batch_size]
    per_image = miner.per_image
    caps = [per_image[int(i)][int(torch.randint(len(per_image[int(i)]), (1,), generator=gstep))] for i in img]
    if warming:
        return StepGroups(captions=caps, images=img.tolist())
    g = torch.Generator().manual_seed(o.seed + 17 + step)
    if o.mining == "global":
        return miner.global_(img.tolist(), caps, fs_text, fs_image, o.negatives_t2i, o.negatives_i2t,
                             o.negative_pool, g)
    return miner.in_batch(img.tolist(), caps, fs_text[caps], fs_image[img], o.negatives_t2i, o.negatives_i2t,
                          o.negative_pool, g)


def _train_step(run: _Run, miner: NegativeMiner, data: CaptionSet, patches_of: Any, fs_text: torch.Tensor,
                fs_image: torch.Tensor, o: EdjeTrainOptions, dev: torch.device, bf16: bool
                ) -> dict[str, torch.Tensor]:
    """One optimizer step (adapter warm-up steps train only the adapter and the image projection)."""
    trainer, opt = run.trainer, run.opt
    warming = run.step < o.adapter_warmup_steps
    groups = _step_groups(miner, data, fs_text, fs_image, o, run.step, warming)
    mult = cosine_lr(run.step, o.steps, o.warmup)
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * mult
    trainer.train()
    with autocast(dev, bf16):
        patches = patches_of(groups.images).float()
        if warming:
            parts = trainer.adapter_warmup_losses(patches, fs_text[groups.captions])
        else:
            g = torch.Generator().manual_seed(o.seed + 31 + run.step)
            parts = trainer.losses(groups, [data.captions[c] for c in groups.captions], patches,
                                   fs_text[groups.captions].to(dev), fs_image[groups.images].to(dev), generator=g)
        loss = trainer.total(parts)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if warming:
        keep = {id(trainer.image_proj.weight), id(trainer.image_proj.bias)}
        for grp in opt.param_groups:
            for p in grp["params"]:
                if grp["name"] == "body" or (grp["name"] == "head" and id(p) not in keep):
                    p.grad = None
    torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
    opt.step()
    run.step += 1
    run.history.append({k: round(float(v.detach()), 4) for k, v in parts.items()} | {"step": run.step})
    return parts


def _write_result(out: Path, reranker: FullJointReranker, o: EdjeTrainOptions, alpha: float, run: _Run,
                  elapsed: float) -> dict[str, Any]:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in reranker.trainable_state().items()}, str(out / WEIGHTS))
    config = {"options": asdict(o), "alpha": alpha, "steps": run.step, "finished": run.step >= o.steps,
              "train_seconds_this_run": round(elapsed, 1),
              "reranker": minilm_full_joint_config(o.num_tokens, o.adapter_hidden,
                                                   num_layers=o.num_layers).to_dict(),
              "last_losses": run.history[-20:]}
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return config
