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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from edje_qdrant.errors import InputError, ModelError
from edje_qdrant.models.full_joint import FullJointReranker, init_full_joint_from_minilm, minilm_full_joint_config
from edje_qdrant.train.common import cosine_lr, pick_device, seed_everything, use_bf16
from edje_qdrant.train.data import CaptionSet
from edje_qdrant.train.loop import Progress, Stage, TrainingLoop
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

    def in_batch(self, img: list[int], caps: list[int], first_text: torch.Tensor, first_image: torch.Tensor,
                 k_t2i: int, k_i2t: int, pool: int, g: torch.Generator | None = None) -> StepGroups:
        """Negatives among the batch's own images / captions; ``fs_*`` are the anchors' embeddings."""
        d = self.data
        ids = torch.tensor(img)
        sim = (first_text @ first_image.t()).float()
        allowed = negative_mask(ids, ids, [d.captions[c] for c in caps],
                                [{d.captions[c] for c in self.per_image[i]} for i in img])
        neg_t2i = sample_hard_negatives(sim, allowed, k_t2i, pool, g)
        neg_i2t = sample_hard_negatives(sim.t(), allowed.t(), k_i2t, pool, g)
        n = len(img)
        return StepGroups(captions=list(caps), images=list(img),
                          t2i=[(r, [r] + neg_t2i[r].tolist()) for r in range(n)],
                          i2t=[(r, [r] + neg_i2t[r].tolist()) for r in range(n)],
                          anchors=[(r, r) for r in range(n)])

    def global_pool(self, img: list[int], caps: list[int], first_text_all: torch.Tensor, first_image_all: torch.Tensor,
                k_t2i: int, k_i2t: int, pool: int, g: torch.Generator | None = None) -> StepGroups:
        """Negatives over the whole split: the images / captions the first stage ranks highest."""
        d = self.data
        s_t2i = (first_text_all[caps] @ first_image_all.t()).float()  # [B, I]
        ok_t2i = torch.ones_like(s_t2i, dtype=torch.bool)
        s_i2t = (first_image_all[img] @ first_text_all.t()).float()  # [B, C]
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

        def image_position(i: int) -> int:
            if i not in img_pos:
                img_pos[i] = len(groups.images)
                groups.images.append(i)
            return img_pos[i]

        def caption_position(c: int) -> int:
            if c not in cap_pos:
                cap_pos[c] = len(groups.captions)
                groups.captions.append(c)
            return cap_pos[c]

        for r, (i, c) in enumerate(zip(img, caps)):
            groups.anchors.append((caption_position(c), image_position(i)))
        for r, (i, c) in enumerate(zip(img, caps)):
            groups.t2i.append((caption_position(c), [image_position(i)] + [image_position(j) for j in neg_t2i[r]]))
            groups.i2t.append((image_position(i), [caption_position(c)] + [caption_position(j) for j in neg_i2t[r]]))
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

    def losses(self, groups: StepGroups, captions: list[str], patches: torch.Tensor, first_text: torch.Tensor,
               first_image: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one step: ``captions`` / ``patches`` [I, n, D] / first-stage embeddings ``first_text``
        [C, e] and ``first_image`` [I, e] are aligned with ``groups.captions`` / ``groups.images``."""
        r = self.reranker
        opts = self.opts
        dev = r.device
        sim = (first_text @ first_image.t()).float()  # [C, I]
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
        if opts.residual:
            score = score + self.alpha * sim[pc, pi].to(dev)
        out: dict[str, torch.Tensor] = {}
        t2i = score[torch.tensor(t2i_idx, device=dev)]
        out["itm_t2i"] = listwise_itm_loss(t2i)
        out["itm_i2t"] = listwise_itm_loss(score[torch.tensor(i2t_idx, device=dev)])
        with torch.no_grad():
            out["acc_t2i"] = (t2i.argmax(1) == 0).float().mean()
        anchor_c = torch.tensor([c for c, _ in groups.anchors], dtype=torch.long)
        anchor_i = torch.tensor([i for _, i in groups.anchors], dtype=torch.long)
        if opts.mlm_weight > 0 and r.mlm is not None:
            n = max(1, int(round(opts.mlm_fraction * len(anchor_c))))
            rows = anchor_c[:n]
            ids = enc.input_ids[rows].cpu()
            special = (enc.token_type_ids[rows].cpu() == 1) | (enc.attention_mask[rows].cpu() == 0)
            special |= (ids == 101) | (ids == 102)
            masked, labels = mask_tokens(ids, special, 103, opts.mlm_prob, generator)
            hidden = r.encode(masked.to(dev), enc.token_type_ids[rows], enc.attention_mask[rows],
                              tokens[anchor_i[:n].to(dev)])
            out["mlm"] = mlm_loss(r.mlm(hidden), labels.to(dev))
        if opts.recovery_weight > 0:
            t = r.tokenizer.backend
            texts = [captions[int(c)] for c in anchor_c]
            single = [e.ids[: e.type_ids.index(1) if 1 in e.type_ids else len(e.ids)]
                      for e in t.encode_batch([(r.tokenizer.escape(c), "<image>") for c in texts])]
            width = max(len(s) for s in single)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in single], device=dev)
            mask = (torch.arange(width, device=dev).view(1, -1) < torch.tensor([len(s) for s in single],
                                                                              device=dev).view(-1, 1)).long()
            h = r.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            out["recovery"] = text_recovery_loss(self.recover(h[:, 0].float()), first_text[anchor_c].to(dev))
        return out

    def adapter_warmup_losses(self, patches: torch.Tensor, first_text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image tokens alone through the joint encoder, mean-pooled and projected, matched contrastively to the
        first-stage embedding of one caption per image (``first_text`` [B, e]); teaches the adapter to write tokens
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
        target = F.normalize(first_text.to(dev).float(), dim=-1)
        logits = max(self.alpha, 10.0) * emb @ target.t()
        labels = torch.arange(b, device=dev)
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        return {"warmup_nce": loss, "warmup_acc": (logits.argmax(1) == labels).float().mean().detach()}

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the loss terms that training minimises."""
        opts = self.opts
        if "warmup_nce" in parts:
            return parts["warmup_nce"]
        loss = parts["itm_t2i"] + parts["itm_i2t"]
        if "mlm" in parts:
            loss = loss + opts.mlm_weight * parts["mlm"]
        if "recovery" in parts:
            loss = loss + opts.recovery_weight * parts["recovery"]
        return loss


def _param_groups(trainer: EdjeTrainer, opts: EdjeTrainOptions) -> list[dict[str, Any]]:
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
    lrs = {"adapter": opts.adapter_lr, "head": opts.head_lr, "body": opts.lr}
    return [{"params": ps, "lr": lrs[k], "base_lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def train_edje(data: CaptionSet, patches_of: Any, first_text: torch.Tensor, first_image: torch.Tensor,
               alpha: float, out: str | Path, opts: EdjeTrainOptions | None = None, *, device: str | None = None,
               precision: str = "auto", resume: bool = False, progress: bool = True,
               reranker: FullJointReranker | None = None) -> dict[str, Any]:
    """Train the reranker on ``data`` (train split). ``patches_of(image_indices) -> [B, n, D]`` gives vision
    tokens; ``first_text`` [C, e] / ``first_image`` [I, e] are first-stage embeddings of its captions / images.

    Checkpoints to ``out/reranker.ckpt`` every ``opts.checkpoint_every`` steps; ``resume`` continues it.
    Writes ``out/reranker.safetensors`` (trained weights only) and ``out/reranker.json``.
    """
    opts = opts or EdjeTrainOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    bf16 = use_bf16(dev, precision)
    seed_everything(opts.seed)
    if reranker is None:
        reranker = initial_reranker(opts, patches_of(list(range(min(32, len(data.images))))))
    trainer = EdjeTrainer(reranker, first_text.shape[1], alpha, opts).to(dev)
    optimizer = torch.optim.AdamW(_param_groups(trainer, opts), weight_decay=0.01)
    if opts.mining == "global" and not isinstance(first_text, torch.Tensor):  # lazily computed embeddings
        first_text = first_text[list(range(len(data.captions)))]
    steps = EdjeSteps(trainer, optimizer, NegativeMiner(data), data, patches_of, first_text, first_image, dev)
    stage = Stage("EDJE reranker", optimizer, opts.steps, steps.batch, steps.forward,
                  lambda step: cosine_lr(step, opts.steps, opts.warmup), out / "reranker.ckpt",
                  opts.checkpoint_every, steps.save_state, steps.load_state, device=dev, bf16=bf16, clip_norm=1.0,
                  after_backward=steps.freeze_during_warmup,
                  postfix=lambda parts: {k: f"{float(v.detach()):.3f}" for k, v in parts.items()},
                  keep_history=True, time_limit_s=opts.time_limit_s)
    done = TrainingLoop(stage, resume=resume, progress=progress).run()
    return _write_result(out, reranker, opts, alpha, done)


def initial_reranker(opts: EdjeTrainOptions, sample_patches: torch.Tensor) -> FullJointReranker:
    """MiniLM-initialised reranker with its adapter queries set from a sample of patch tokens."""
    reranker = FullJointReranker(minilm_full_joint_config(opts.num_tokens, opts.adapter_hidden,
                                                          mlm_head=opts.mlm_weight > 0, num_layers=opts.num_layers))
    init_full_joint_from_minilm(reranker)
    if opts.adapter_init == "prototypes":
        init_adapter_prototypes(reranker, sample_patches, opts.seed)
    else:
        init_adapter_queries(reranker, sample_patches, opts.seed)
    if opts.head_init_std > 0:
        with torch.no_grad():
            reranker.head[1].weight.normal_(0.0, opts.head_init_std)
    return reranker


@dataclass
class EdjeBatch:
    """One step's anchors and negatives, and whether it is an adapter warm-up step."""

    step: int
    groups: StepGroups
    warming: bool


class EdjeSteps:
    """The EDJE reranker's part of the training loop: batches, losses and the checkpointed trainer state."""

    NOT_SAVED = ("reranker.bert.embeddings.word_embeddings.weight", "reranker.mlm.predictions.decoder.weight")

    def __init__(self, trainer: EdjeTrainer, optimizer: torch.optim.Optimizer, miner: NegativeMiner,
                 data: CaptionSet, patches_of: Any, first_text: torch.Tensor, first_image: torch.Tensor,
                 device: torch.device) -> None:
        self.trainer, self.optimizer, self.miner, self.data = trainer, optimizer, miner, data
        self.patches_of = patches_of
        self.first_text, self.first_image, self.device = first_text, first_image, device
        self.opts = trainer.opts

    def batch(self, step: int) -> EdjeBatch:
        """This step's anchors (images + one caption each) and their hard negatives; a function of the step only."""
        opts, miner, data = self.opts, self.miner, self.data
        warming = step < opts.adapter_warmup_steps
        step_generator = torch.Generator().manual_seed(opts.seed * 100003 + step)
        size = opts.adapter_warmup_batch if warming else opts.batch_size
        img = torch.randperm(len(data.images), generator=step_generator)[:size]
        per_image = miner.per_image
        caps = [per_image[int(i)][int(torch.randint(len(per_image[int(i)]), (1,), generator=step_generator))]
                for i in img]
        if warming:
            return EdjeBatch(step, StepGroups(captions=caps, images=img.tolist()), True)
        negatives_generator = torch.Generator().manual_seed(opts.seed + 17 + step)
        if opts.mining == "global":
            groups = miner.global_pool(img.tolist(), caps, self.first_text, self.first_image, opts.negatives_t2i,
                                   opts.negatives_i2t, opts.negative_pool, negatives_generator)
        else:
            groups = miner.in_batch(img.tolist(), caps, self.first_text[caps], self.first_image[img],
                                    opts.negatives_t2i, opts.negatives_i2t, opts.negative_pool, negatives_generator)
        return EdjeBatch(step, groups, False)

    def forward(self, batch: EdjeBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss terms (adapter warm-up steps: the warm-up contrastive loss only)."""
        trainer, groups = self.trainer, batch.groups
        trainer.train()
        patches = self.patches_of(groups.images).float()
        if batch.warming:
            parts = trainer.adapter_warmup_losses(patches, self.first_text[groups.captions])
        else:
            mask_generator = torch.Generator().manual_seed(self.opts.seed + 31 + batch.step)
            parts = trainer.losses(groups, [self.data.captions[c] for c in groups.captions], patches,
                                   self.first_text[groups.captions].to(self.device),
                                   self.first_image[groups.images].to(self.device), generator=mask_generator)
        return trainer.total(parts), parts

    def freeze_during_warmup(self, step: int) -> None:
        """Warm-up steps train only the adapter and the image projection: drop the other gradients."""
        if step >= self.opts.adapter_warmup_steps:
            return
        trainer = self.trainer
        keep = {id(trainer.image_proj.weight), id(trainer.image_proj.bias)}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if group["name"] == "body" or (group["name"] == "head" and id(p) not in keep):
                    p.grad = None

    def save_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.trainer.state_dict().items() if k not in self.NOT_SAVED}

    def load_state(self, state: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        _, unexpected = self.trainer.load_state_dict(state, strict=False)
        if unexpected:
            raise ModelError(f"reranker checkpoint: unexpected keys {unexpected}; it belongs to another "
                             "configuration")


def _write_result(out: Path, reranker: FullJointReranker, opts: EdjeTrainOptions, alpha: float, done: Progress
                  ) -> dict[str, Any]:
    save_file({k: v.contiguous() for k, v in reranker.trainable_state().items()}, str(out / WEIGHTS))
    config = {"options": asdict(opts), "alpha": alpha, "steps": done.step, "finished": done.step >= opts.steps,
              "train_seconds_this_run": round(done.seconds, 1),
              "reranker": minilm_full_joint_config(opts.num_tokens, opts.adapter_hidden,
                                                   num_layers=opts.num_layers).to_dict(),
              "last_losses": done.history[-20:]}
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return config
