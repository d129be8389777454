"""Training of the split reranker on cached DINOv2 tokens, with query-time-like candidates.

Each step scores listwise groups in both directions: a training caption against its own image and the hardest
images that a cross-fitted first stage (one that never saw them) ranks near it, and an image against one of its
captions and the hardest other captions. The score is ``first-stage logit + joint logit`` (residual; the
first-stage term may carry a learned gain, which becomes the exported fusion weight), the loss a cross-entropy
over each group. Binding lists (``counterfeits > 0``) add image-centric groups of a true caption against its
counterfeits (``train/counterfeit.py``), and ``mined`` puts attribute-mined images among the text->image
negatives. Augmentations: counterfactual views with rewritten captions (``train/views.py``: mirrored,
recoloured) and token dropout before the adapter. A slice of the training images is held back for early stopping.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from edje_qdrant.errors import InputError
from edje_qdrant.models.split_joint import SplitJointConfig, SplitJointReranker, pool_patches
from edje_qdrant.train.attribute_mining import AttributeIndex, mined_candidates
from edje_qdrant.train.binding_lists import BindingSampler, CounterfeitSet, extend_tables, training_counterfeits
from edje_qdrant.train.counterfeit import CaptionStats
from edje_qdrant.train.common import autocast, cosine_lr, seed_everything
from edje_qdrant.train.crossfit import HeldOutScores, heldout_text_embeddings
from edje_qdrant.train.data import CaptionSet
from edje_qdrant.train.loop import Evaluation, Stage, TrainingLoop
from edje_qdrant.train.rerank_eval import rerank_recall
from edje_qdrant.train.split_init import init_adapter_from_first_stage, init_joint_from_minilm
from edje_qdrant.train.text_states import TextStates
from edje_qdrant.train.token_cache import TokenCache, colour_cache, view_folder
from edje_qdrant.train.views import VIEWS, recolourable, view_caption

log = logging.getLogger(__name__)
WEIGHTS = "split_reranker.safetensors"
CONFIG = "split_reranker.json"


@dataclass
class SplitTrainOptions:
    """Every lever of the split reranker recipe (``train --set KEY=VALUE`` names)."""

    layers: list[int] = field(default_factory=lambda: [12])  # DINOv2 layers concatenated as adapter input
    views: list[str] = field(default_factory=lambda: ["orig", "flip"])  # cached views sampled per image
    num_tokens: int = 32
    joint_layers: int = 1
    text_layers: int = 5
    patch_pool: int = 2
    adapter: str = "attention"
    adapter_init: str = "random"  # "random" | "first_stage" (pool adapter: from the first stage's LiT heads)
    colour: bool = False  # append per-cell colour features to the pool adapter's input
    late_dim: int = 0  # > 0: add the late-interaction term (see SplitJointReranker.late_scores)
    cross_dim: int = 0  # > 0: a cross-attention sublayer (text -> image tokens only) in each joint layer
    evidence_dim: int = 0  # > 0: the word-evidence term (models/split_joint.WordEvidence) of this width
    evidence_lr: float = 1e-3
    late_steps: int = 0  # in-batch contrastive steps on the late term (+ adapter) before the joint steps
    late_batch: int = 128  # images per in-batch step (all of one fold; one caption each)
    late_lr: float = 1e-3
    adapter_hidden: int = 768
    candidates: int = 16  # group size (1 positive + candidates-1 hard negatives)
    negative_pool: int = 24  # negatives drawn from this many hardest (>= candidates-1)
    batch_captions: int = 32
    batch_images: int = 16
    epochs: float = 1.0
    lr: float = 1e-4
    adapter_lr: float = 3e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    token_dropout: float = 0.25
    i2t_weight: float = 1.0
    val_images: int = 300
    eval_every: int = 150
    seed: int = 0
    # binding (counterfeit captions, train/counterfeit.py): image -> [true caption, up to `counterfeits` of its
    # counterfeits, hard captions] lists, `binding_images` of them per step, loss weight `binding_weight`
    counterfeits: int = 0
    binding_images: int = 16
    binding_weight: float = 1.0
    mined: int = 0  # of each text->image list's negatives, up to this many attribute-mined images
    learn_fusion: bool = False  # learn the first-stage weight with the reranker (a gain on the residual term)

    def __post_init__(self) -> None:
        if self.negative_pool < self.candidates - 1 or self.candidates < 2:
            raise InputError("candidates must be >= 2 and negative_pool >= candidates - 1")
        if not 0.0 <= self.token_dropout < 1.0:
            raise InputError(f"token_dropout must be in [0, 1), got {self.token_dropout}")
        if any(v not in VIEWS for v in self.views) or not self.views:
            raise InputError(f"views must be a non-empty subset of {'/'.join(VIEWS)}, got {self.views}")
        if "recolour" in self.views and not self.colour:
            raise InputError("the recolour view changes only the colour features: it needs colour=true")
        if not 0 <= self.mined <= self.candidates - 1 or not 0 <= self.counterfeits <= self.candidates - 1:
            raise InputError("mined and counterfeits must be in [0, candidates - 1]")

    def model_config(self) -> SplitJointConfig:
        return SplitJointConfig(vision_width=384 * len(self.layers), num_tokens=self.num_tokens,
                                adapter_hidden=self.adapter_hidden, patch_pool=self.patch_pool,
                                adapter=self.adapter, colour=self.colour, late_dim=self.late_dim,
                                cross_dim=self.cross_dim, evidence_dim=self.evidence_dim,
                                text_layers=self.text_layers,
                                joint_layers=self.joint_layers)


def load_patch_tokens(root: str | Path, names: list[str], view: str, layers: list[int], pool: int,
                      chunk: int = 256, colour_from: str | Path | None = None) -> torch.Tensor:
    """Pooled patch tokens (CLS dropped) of ``names`` for one view, layers concatenated: fp16 [N, P, 384 x L];
    with ``colour_from`` (the images folder) the pooled colour features are appended (+14)."""
    # the recoloured view has the original's DINOv2 tokens (trained to ignore colour) and its own colour features
    caches = [TokenCache(view_folder(root, "orig" if view == "recolour" else view, k)) for k in layers]
    colour = None
    if colour_from is not None:
        all_names = caches[0].images
        feats = colour_cache(colour_from, all_names, root, view)
        index = {n: i for i, n in enumerate(all_names)}
    parts = []
    for i in range(0, len(names), chunk):
        rows = [pool_patches(c.rows(names[i:i + chunk])[:, 1:].float(), pool) for c in caches]
        if colour_from is not None:
            colour = torch.from_numpy(np.asarray(feats[[index[n] for n in names[i:i + chunk]]], dtype=np.float32))
            rows.append(pool_patches(colour, pool))
        parts.append(torch.cat(rows, dim=-1).half())
    return torch.cat(parts)


def first_stage_candidates(query_emb: torch.Tensor, item_emb: torch.Tensor, allowed: torch.Tensor, pool: int,
                           chunk: int = 1024) -> torch.Tensor:
    """Per query row, the ``pool`` most similar allowed items (indices [Q, pool])."""
    out = []
    for i in range(0, query_emb.shape[0], chunk):
        sim = query_emb[i:i + chunk] @ item_emb.t()
        sim = sim.masked_fill(~allowed[i:i + chunk], float("-inf"))
        out.append(sim.topk(pool, dim=1).indices)
    return torch.cat(out)


class GroupSampler:
    """Listwise groups over the training images of one fold each: column 0 is the positive."""

    def __init__(self, data: CaptionSet, held: HeldOutScores, train_images: torch.Tensor, opts: SplitTrainOptions,
                 attribute_index: AttributeIndex | None = None) -> None:
        self.data, self.held, self.opts = data, held, opts
        self.cap_img = torch.tensor(data.caption_image)
        img_ok = torch.zeros(len(data.images), dtype=torch.bool)
        img_ok[train_images] = True
        self.captions = img_ok[self.cap_img].nonzero().flatten()  # captions whose image is trained on
        self.images = train_images
        fold_img = held.image_fold
        norm = [c.strip().lower() for c in data.captions]
        # t2i: images of the caption's fold, not its own, not an image holding an identical caption
        same_text: dict[str, set[int]] = {}
        for c, t in enumerate(norm):
            same_text.setdefault(t, set()).add(int(self.cap_img[c]))
        allowed = (fold_img[self.cap_img[self.captions]].view(-1, 1) == fold_img.view(1, -1)) & img_ok.view(1, -1)
        allowed[torch.arange(len(self.captions)), self.cap_img[self.captions]] = False
        for r, c in enumerate(self.captions.tolist()):
            for j in same_text[norm[c]]:
                allowed[r, j] = False
        self.t2i = first_stage_candidates(held.caption_emb[self.captions], held.image_emb, allowed,
                                          opts.negative_pool)
        self.mined = None
        if opts.mined and attribute_index is not None:
            self.mined = mined_candidates(attribute_index, data.captions, self.captions, self.cap_img,
                                          held.caption_emb[self.captions], held.image_emb, allowed,
                                          opts.negative_pool)
        # i2t: captions of the image's fold (of trained images), not its own, not identical to its own
        cap_fold = fold_img[self.cap_img]
        allowed_c = (fold_img[self.images].view(-1, 1) == cap_fold.view(1, -1)) & img_ok[self.cap_img].view(1, -1)
        own = self.cap_img.view(1, -1) == self.images.view(-1, 1)
        allowed_c &= ~own
        for r, i in enumerate(self.images.tolist()):
            for c in own[r].nonzero().flatten().tolist():
                for j in same_text[norm[c]]:
                    allowed_c[r, self.cap_img == j] = False
        self.i2t = first_stage_candidates(held.image_emb[self.images], held.caption_emb, allowed_c,
                                          opts.negative_pool)
        self.own_captions = [own[r].nonzero().flatten() for r in range(len(self.images))]

    def _draw(self, pool: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        k = self.opts.candidates - 1
        pick = torch.rand(pool.shape, generator=g).argsort(dim=1)[:, :k]
        return pool.gather(1, pick)

    def t2i_groups(self, rows: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption index [B], image indices [B, K]) for caption rows of ``self.captions``; with attribute mining,
        up to ``mined`` of the K-1 negatives are attribute-mined images (the rest first-stage hard ones)."""
        caps = self.captions[rows]
        negatives = self._draw(self.t2i[rows], g)
        if self.mined is not None:
            negatives = self._with_mined(negatives, self.mined[rows], g)
        return caps, torch.cat([self.cap_img[caps].view(-1, 1), negatives], dim=1)

    def _with_mined(self, hard: torch.Tensor, mined: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Each row: up to ``mined`` random attribute-mined images, then hard negatives not already in the row."""
        out = hard.clone()
        for r in range(hard.shape[0]):
            pool = mined[r][mined[r] >= 0]
            if not len(pool):
                continue
            pick = pool[torch.randperm(len(pool), generator=g)[: self.opts.mined]].tolist()
            rest = [x for x in hard[r].tolist() if x not in pick]
            out[r] = torch.tensor((pick + rest)[: hard.shape[1]])
        return out

    def i2t_groups(self, rows: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index [B], caption indices [B, K]) for image rows of ``self.images``; one own caption first."""
        pos = torch.stack([self.own_captions[r][torch.randint(len(self.own_captions[r]), (1,), generator=g)]
                           for r in rows.tolist()]).view(-1, 1)
        return self.images[rows], torch.cat([pos, self._draw(self.i2t[rows], g)], dim=1)


class SplitTrainer:
    """One step = t2i groups + i2t groups through the split reranker, residual listwise loss."""

    def __init__(self, model: SplitJointReranker, data: CaptionSet, tokens: dict[str, torch.Tensor],
                 held: HeldOutScores, opts: SplitTrainOptions, device: torch.device, bf16: bool,
                 memo_dir: str | Path | None = None, n_captions: int | None = None) -> None:
        """``data`` may end with counterfeit captions: the first ``n_captions`` (default all) are true ones."""
        self.model, self.data, self.tokens, self.held, self.opts = model, data, tokens, held, opts
        self.device, self.bf16 = device, bf16
        self.cap_img = torch.tensor(data.caption_image)
        # text-state cache rows: every caption, then per view the rewritten text of each caption it changes
        texts = list(data.captions)
        self.view_rows: dict[str, dict[int, int]] = {}
        for view in [v for v in opts.views if v != "orig"]:
            rewritten = {c: view_caption(t, view) for c, t in enumerate(data.captions)}
            changed = [c for c, t in rewritten.items() if t != data.captions[c]]
            self.view_rows[view] = {c: len(texts) + n for n, c in enumerate(changed)}
            texts += [rewritten[c] for c in changed]
        # the recoloured view is shown only for images whose every (true) caption can follow it
        first_fake = n_captions if n_captions is not None else len(data.captions)
        blocked = {data.caption_image[c] for c in range(first_fake) if not recolourable(data.captions[c])}
        self.recolour_ok = set(range(len(data.images))) - blocked
        t0 = time.time()
        model.eval()
        key = hashlib.sha256("\n".join(texts).encode() + f"|L{model.config.text_layers}".encode()).hexdigest()
        memo = Path(memo_dir) / f"text_states_L{model.config.text_layers}_{key[:12]}.safetensors" if memo_dir else None
        states = TextStates.load(memo, key) if memo else None
        if states is None:
            states = TextStates(model, texts)
            if memo:
                states.save(memo, key)
        self.text_states = states
        self.log_gain = torch.zeros((), device=device, requires_grad=True) if opts.learn_fusion else None
        log.info("text states of %d texts (%d captions) in %.0f s", len(texts), len(data.captions), time.time() - t0)

    def image_tokens(self, images: torch.Tensor, views: list[str], train: bool) -> torch.Tensor:
        """Adapter output for unique (image, view) pairs [U, m', d] (m' < m with token dropout)."""
        patches = torch.empty((len(views),) + tuple(self.tokens[views[0]].shape[1:]), dtype=torch.float32)
        for v in set(views):
            rows = torch.tensor([n for n, w in enumerate(views) if w == v])
            patches[rows] = self.tokens[v][images[rows]].float()
        tokens = self.model.adapter(patches.to(self.device))
        if train and self.opts.token_dropout > 0:  # drop a random subset of each image's tokens (as keys)
            keep = max(1, int(round(tokens.shape[1] * (1 - self.opts.token_dropout))))
            idx = torch.rand(tokens.shape[:2]).argsort(dim=1)[:, :keep].to(self.device)
            tokens = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return tokens

    def group_logits(self, text_ids: list[int], pairs_img: torch.Tensor, pairs_txt: torch.Tensor,
                     views: list[str], train: bool) -> torch.Tensor:
        """Joint logits for pairs (row of ``text_ids`` (rows of the text-state cache), image index) -> [P]."""
        key = [(int(i), v) for i, v in zip(pairs_img.tolist(), views)]
        uniq = sorted(set(key))
        slot = {k: n for n, k in enumerate(uniq)}
        tok = self.image_tokens(torch.tensor([k[0] for k in uniq]), [k[1] for k in uniq], train)
        tok = tok[torch.tensor([slot[k] for k in key], device=self.device)]
        text, mask = self.text_states.batch(text_ids, self.device)
        return self.model.pair_logits(text[pairs_txt], mask[pairs_txt], tok)

    def draw_view(self, image: int, g: torch.Generator) -> str:
        """A random view of ``image`` among the options' views (``recolour`` only where its captions follow)."""
        view = self.opts.views[int(torch.randint(len(self.opts.views), (1,), generator=g))]
        return "orig" if view == "recolour" and image not in self.recolour_ok else view

    def text_row(self, caption: int, view: str) -> int:
        """Row of the text-state cache holding ``caption`` as rewritten for ``view``."""
        return self.view_rows.get(view, {}).get(caption, caption)

    def fusion_gain(self) -> torch.Tensor:
        """Multiplier of the first-stage term: learned (``learn_fusion``) or 1."""
        return self.log_gain.exp() if self.log_gain is not None else torch.ones((), device=self.device)

    def loss(self, t2i: tuple[torch.Tensor, torch.Tensor], i2t: tuple[torch.Tensor, torch.Tensor],
             g: torch.Generator, binding: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
        """Listwise cross-entropy (column 0 is the positive) over text->image groups, image->text groups and,
        when given, image-centric binding lists (true caption vs its counterfeits and hard captions)."""
        caps, cand_img = t2i
        b, k = cand_img.shape
        image_sets = [("i2t", i2t[0], i2t[1], self.opts.i2t_weight)]
        if binding is not None:
            image_sets.append(("binding", binding[0], binding[1], self.opts.binding_weight))
        # one view per image of the step; its captions are rewritten to match (views.py)
        all_imgs = torch.cat([cand_img.flatten()] + [imgs for _, imgs, _, _ in image_sets])
        view_of = {i: self.draw_view(i, g) for i in set(all_imgs.tolist())}
        texts: list[int] = []
        pairs_txt, pairs_img, views = [], [], []
        text_row: dict[tuple[int, str], int] = {}

        def add(c: int, i: int) -> None:
            view = view_of[i]
            if (c, view) not in text_row:
                text_row[(c, view)] = len(texts)
                texts.append(self.text_row(c, view))
            pairs_txt.append(text_row[(c, view)])
            pairs_img.append(i)
            views.append(view)

        for r in range(b):
            for j in cand_img[r].tolist():
                add(int(caps[r]), j)
        for _, imgs, cand, _ in image_sets:
            for r in range(imgs.shape[0]):
                for c in cand[r].tolist():
                    add(c, int(imgs[r]))
        with autocast(self.device, self.bf16):
            joint = self.group_logits(texts, torch.tensor(pairs_img), torch.tensor(pairs_txt, device=self.device),
                                      views, train=True).float()
        gain = self.fusion_gain()
        first_t2i = self.held.logits(caps.view(-1, 1).expand(-1, k), cand_img, self.cap_img)
        s_t2i = gain * first_t2i.to(self.device) + joint[:b * k].view(b, k)
        parts = {"t2i": F.cross_entropy(s_t2i, torch.zeros(b, dtype=torch.long, device=self.device))}
        parts["total"] = parts["t2i"]
        parts["acc_t2i"] = (s_t2i.argmax(1) == 0).float().mean()
        start = b * k
        for name, imgs, cand, weight in image_sets:
            n = cand.numel()
            first = self.held.logits(cand, imgs.view(-1, 1).expand(-1, cand.shape[1]), self.cap_img)
            scores = gain * first.to(self.device) + joint[start:start + n].view(imgs.shape[0], -1)
            start += n
            parts[name] = F.cross_entropy(scores, torch.zeros(imgs.shape[0], dtype=torch.long, device=self.device))
            parts[f"acc_{name}"] = (scores.argmax(1) == 0).float().mean()
            parts["total"] = parts["total"] + weight * parts[name]
        return parts


def late_loss(trainer: "SplitTrainer", sampler: GroupSampler, g: torch.Generator) -> dict[str, torch.Tensor]:
    """In-batch contrastive step on the late-interaction term: images of one fold, one own caption each; the
    score is the fold model's first-stage logit + the late term, cross-entropy both ways."""
    opts, held = trainer.opts, trainer.held
    folds = held.image_fold[sampler.images]
    fold = int(folds[torch.randint(len(folds), (1,), generator=g)])
    pool = sampler.images[folds == fold]
    imgs = pool[torch.randperm(len(pool), generator=g)[: opts.late_batch]]
    rows = {int(i): r for r, i in enumerate(sampler.images.tolist())}
    caps = torch.stack([sampler.own_captions[rows[int(i)]][torch.randint(len(sampler.own_captions[rows[int(i)]]),
                                                                          (1,), generator=g)] for i in imgs]).flatten()
    views = [trainer.draw_view(int(i), g) for i in imgs]
    text_ids = [trainer.text_row(int(c), v) for c, v in zip(caps, views)]
    with autocast(trainer.device, trainer.bf16):
        tok = trainer.image_tokens(imgs, views, train=True)
    text, mask = trainer.text_states.batch(text_ids, trainer.device)
    late = trainer.model.late_scores(text, mask, tok)  # [B, B]
    first = held.scale[fold] * held.caption_emb[caps] @ held.image_emb[imgs].t()
    scores = first.to(trainer.device) + late
    target = torch.arange(len(imgs), device=trainer.device)
    loss = 0.5 * (F.cross_entropy(scores, target) + F.cross_entropy(scores.t(), target))
    return {"total": loss, "acc_t2i": (scores.argmax(1) == target).float().mean()}


def param_groups(model: SplitJointReranker, opts: SplitTrainOptions) -> list[dict[str, Any]]:
    groups: dict[str, list[torch.nn.Parameter]] = {"adapter": [], "head": [], "joint": [], "late": [],
                                                   "evidence": []}
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("text_bert."):
            continue
        top = name.split(".")[0]
        groups["late" if top.startswith("late_") else top if top in groups else "joint"].append(p)
    lrs = {"adapter": opts.adapter_lr, "head": opts.head_lr, "joint": opts.lr, "late": opts.late_lr,
           "evidence": opts.evidence_lr}
    return [{"params": ps, "lr": lrs[n], "base_lr": lrs[n], "weight_decay": opts.weight_decay}
            for n, ps in groups.items() if ps]


def split_train_val(image_fold: torch.Tensor, val_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image indices (train, val): ``val_images`` of fold 0 held back for early stopping, never trained on (one
    fold, so all their first-stage scores come from one model and are comparable)."""
    g = torch.Generator().manual_seed(seed + 17)
    fold0 = (image_fold == 0).nonzero().flatten()
    val = fold0[torch.randperm(len(fold0), generator=g)[:val_images]].sort().values
    keep = torch.ones(len(image_fold), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


def train_split_reranker(data: CaptionSet, token_root: str | Path, names: list[str], held: HeldOutScores,
                         out: str | Path, opts: SplitTrainOptions, device: torch.device, bf16: bool,
                         resume: bool = False, progress: bool = True,
                         first_stage_heads: tuple[torch.Tensor, torch.Tensor] | None = None,
                         images_dir: str | Path | None = None, crossfit_dir: str | Path | None = None
                         ) -> dict[str, Any]:
    """Train on ``data`` (train split), early-stopped on held-back training images; writes ``out/WEIGHTS``
    (the best step by validation R@1, plus binding accuracy when counterfeits are on) and ``out/CONFIG``.
    ``crossfit_dir`` (the fold models) embeds counterfeit captions. Returns the config with the val curve."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(opts.seed)
    colour = images_dir if opts.colour else None
    if opts.colour and images_dir is None:
        raise InputError("colour=True needs the images folder (images_dir) to compute colour features")
    tokens = {v: load_patch_tokens(token_root, names, v, opts.layers, opts.patch_pool, colour_from=colour)
              for v in set(opts.views) | {"orig"}}
    train_imgs, val_imgs = split_train_val(held.image_fold, opts.val_images, opts.seed)
    attribute_index = AttributeIndex(data.captions, data.caption_image, CaptionStats(data.captions)) \
        if opts.mined else None
    sampler = GroupSampler(data, held, train_imgs, opts, attribute_index)
    binding = binding_setup(data, held, sampler, train_imgs, val_imgs, opts, crossfit_dir, device, bf16)
    model = new_split_model(opts, device, first_stage_heads)
    trainer = SplitTrainer(model, binding.data, tokens, binding.held, opts, device, bf16, memo_dir=out.parent,
                           n_captions=len(data.captions))
    groups = param_groups(model, opts)
    if trainer.log_gain is not None:
        groups.append({"params": [trainer.log_gain], "lr": opts.head_lr, "base_lr": opts.head_lr,
                       "weight_decay": 0.0})
    steps = SplitSteps(trainer, sampler, binding.sampler, opts)
    evaluation = Evaluation(_val_fn(trainer, tokens["orig"], val_imgs, binding.checks, len(data.captions)),
                            opts.eval_every, val_score, steps.snapshot)
    stage = Stage("split reranker", torch.optim.AdamW(groups), steps.total, steps.batch, steps.forward,
                  steps.lr_scale, out / "split_reranker.ckpt", opts.eval_every, model.trainable_state,
                  steps.load_state, clip_norm=1.0, epoch_of=steps.epoch_of, extra=steps.extra,
                  postfix=lambda parts: {"loss": f"{parts['total'].item():.3f}",
                                         "acc": f"{parts['acc_t2i'].item():.2f}"},
                  evaluation=evaluation)  # bf16 off: the trainer autocasts the joint encoder itself
    log.info("split reranker: %d steps", steps.total)
    done = TrainingLoop(stage, resume=resume, progress=progress).run()
    state, gain = done.best_state if done.best_state is not None else steps.snapshot()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    config = {"reranker": opts.model_config().to_dict(), "options": asdict(opts), "steps": done.step,
              "best_step": done.best_step, "fusion_gain": gain, "train_seconds": round(done.seconds, 1),
              "pairs_per_second": round(steps.pairs / max(done.seconds, 1e-9), 1), "val_curve": done.curve}
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return config


def new_split_model(opts: SplitTrainOptions, device: torch.device,
                    first_stage_heads: tuple[torch.Tensor, torch.Tensor] | None) -> SplitJointReranker:
    """A split reranker of the options' shape: joint layers from MiniLM, the adapter optionally from the first
    stage's heads (image_head, text_proj)."""
    model = SplitJointReranker(opts.model_config()).to(device)
    init_joint_from_minilm(model)
    if opts.adapter_init == "first_stage":
        if first_stage_heads is None:
            raise InputError("adapter_init=first_stage needs the first stage's heads (image_head, text_proj)")
        init_adapter_from_first_stage(model, *first_stage_heads)
    return model


@dataclass
class BindingSetup:
    """The caption table training reads (true captions, then counterfeits when on), their held-out scores, the
    binding-list sampler and the held-back (true, counterfeit) pairs validation scores."""

    data: CaptionSet
    held: HeldOutScores
    sampler: BindingSampler | None = None
    checks: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None


def binding_setup(data: CaptionSet, held: HeldOutScores, sampler: GroupSampler, train_imgs: torch.Tensor,
                  val_imgs: torch.Tensor, opts: SplitTrainOptions, crossfit_dir: str | Path | None,
                  device: torch.device, bf16: bool) -> BindingSetup:
    """Counterfeit captions of the training captions, embedded by the fold models (``crossfit_dir``), when
    ``opts.counterfeits`` is on; else the captions as they are."""
    if not opts.counterfeits:
        return BindingSetup(data, held)
    if crossfit_dir is None:
        raise InputError("counterfeits need the cross-fitted first stages (crossfit_dir) to embed them")
    fakes = training_counterfeits(data, held.image_fold, opts.seed)
    fold_of_fake = held.image_fold[torch.tensor([data.caption_image[c] for c in fakes.source], dtype=torch.long)]
    emb = heldout_text_embeddings(crossfit_dir, fakes.texts, fold_of_fake, device, bf16)
    text_data, text_held = extend_tables(data, held, fakes, emb)
    binder = BindingSampler(fakes, len(data.captions), data.caption_image, train_imgs, sampler.i2t,
                            opts.counterfeits, opts.candidates)
    checks = _val_binding_pairs(fakes, len(data.captions), data.caption_image, val_imgs)
    log.info("binding lists: %d counterfeits of %d training captions; %d val pairs", len(fakes.texts),
             len(binder), len(checks[0]))
    return BindingSetup(text_data, text_held, binder, checks)


@dataclass
class SplitBatch:
    """One step's caption rows (text->image groups) and image rows (image->text groups)."""

    step: int
    caption_rows: torch.Tensor
    image_rows: torch.Tensor


class SplitSteps:
    """The split reranker's part of the training loop: the in-batch late-interaction steps first (``late_steps``),
    then epochs over the training captions, each phase on its own cosine schedule."""

    def __init__(self, trainer: SplitTrainer, sampler: GroupSampler, binder: BindingSampler | None,
                 opts: SplitTrainOptions) -> None:
        self.trainer, self.sampler, self.binder, self.opts = trainer, sampler, binder, opts
        self.steps_per_epoch = len(sampler.captions) // opts.batch_captions
        self.total = opts.late_steps + max(1, int(self.steps_per_epoch * opts.epochs))
        self.generator: torch.Generator | None = None  # seeded at the first step this run takes
        self.pairs = 0  # joint-encoder pairs scored (the in-batch late steps score B x B cheaply, not counted)

    def batch(self, step: int) -> SplitBatch:
        opts = self.opts
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(opts.seed * 7919 + step)
        epoch, position = divmod(max(0, step - opts.late_steps), self.steps_per_epoch)
        order = torch.randperm(len(self.sampler.captions), generator=torch.Generator().manual_seed(opts.seed + epoch))
        rows = order[position * opts.batch_captions:(position + 1) * opts.batch_captions]
        image_rows = torch.randint(len(self.sampler.images), (opts.batch_images,), generator=self.generator)
        return SplitBatch(step, rows, image_rows)

    def forward(self, batch: SplitBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opts, trainer, sampler, generator = self.opts, self.trainer, self.sampler, self.generator
        assert generator is not None
        trainer.model.train()
        trainer.model.text_bert.eval()
        if batch.step < opts.late_steps:
            parts = late_loss(trainer, sampler, generator)
        else:
            binding = self.binder.groups(opts.binding_images, generator) if self.binder is not None else None
            parts = trainer.loss(sampler.t2i_groups(batch.caption_rows, generator),
                                 sampler.i2t_groups(batch.image_rows, generator), generator, binding)
            self.pairs += opts.candidates * (opts.batch_captions + opts.batch_images
                                             + (opts.binding_images if self.binder is not None else 0))
        return parts["total"], parts

    def lr_scale(self, step: int) -> float:
        late = self.opts.late_steps
        phase_step, phase_total = (step, late) if step < late else (step - late, self.total - late)
        return cosine_lr(phase_step, phase_total, max(1, phase_total // 20))

    def epoch_of(self, step: int) -> int:
        """The epoch of the step just taken (``step`` steps done)."""
        return max(0, step - 1 - self.opts.late_steps) // self.steps_per_epoch

    def snapshot(self) -> tuple[dict[str, torch.Tensor], float]:
        """(trained weights, fusion gain) now."""
        return self.trainer.model.trainable_state(), float(self.trainer.fusion_gain().detach())

    def extra(self) -> dict[str, Any]:
        return {"log_gain": float(self.trainer.fusion_gain().detach().log())}

    def load_state(self, state: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.trainer.model.load_state_dict(state, strict=False)
        if self.trainer.log_gain is not None and "log_gain" in extra:
            with torch.no_grad():
                self.trainer.log_gain.fill_(float(extra["log_gain"]))


def val_score(v: dict[str, float]) -> float:
    """What early stopping maximises: held-back R@1 both ways, plus mean binding accuracy when measured."""
    return v["t2i_r1"] + v["i2t_r1"] + v.get("binding", 0.0)


def _val_binding_pairs(fakes: CounterfeitSet, n_captions: int, caption_image: list[int], val_imgs: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(true caption ids, counterfeit ids, kinds) of the counterfeits of the held-back images' captions."""
    held_back = set(val_imgs.tolist())
    rows = [(c, n_captions + j, k) for j, (c, k) in enumerate(zip(fakes.source, fakes.kinds))
            if caption_image[c] in held_back]
    return (torch.tensor([r[0] for r in rows], dtype=torch.long), torch.tensor([r[1] for r in rows], dtype=torch.long),
            [r[2] for r in rows])


def _val_fn(trainer: SplitTrainer, tokens: torch.Tensor, val_imgs: torch.Tensor,
            binding_pairs: tuple[torch.Tensor, torch.Tensor, list[str]] | None, n_captions: int) -> Any:
    """Validation closure: R@1 of first stage vs re-ranked within the held-back images (rerank top 16, first
    stage x the fusion gain; the first ``n_captions`` captions are true ones), and with ``binding_pairs`` the
    accuracy of true caption vs counterfeit per kind (``binding``: their mean, percent)."""
    model, held, device, bf16 = trainer.model, trainer.held, trainer.device, trainer.bf16
    cap_img = trainer.cap_img
    in_val = torch.zeros(len(held.image_fold), dtype=torch.bool)
    in_val[val_imgs] = True
    val_caps = in_val[cap_img[:n_captions]].nonzero().flatten()
    cap_e, img_e = held.caption_emb[val_caps], held.image_emb[val_imgs]  # all of fold 0: one model's space
    scale = held.scale[held.image_fold[cap_img[val_caps]]].view(-1, 1)
    sim = scale * (cap_e @ img_e.t())
    pos = (cap_img[val_caps].view(-1, 1) == val_imgs.view(1, -1)).float().argmax(1)
    val_tokens = tokens[val_imgs]
    captions = trainer.text_states.subset(val_caps)
    column = {int(i): n for n, i in enumerate(val_imgs.tolist())}

    def run() -> dict[str, float]:
        model.eval()
        gain = float(trainer.fusion_gain().detach())
        with torch.inference_mode(), autocast(device, bf16):
            comp = model.adapter(val_tokens.to(device).float()).float()
            out = rerank_recall(model, captions, gain * sim, pos, comp, k=16)["summary"]
            if binding_pairs is not None and len(binding_pairs[0]):
                out.update(_binding_accuracy(trainer, comp, column, gain, *binding_pairs))
        return out
    return run


def _binding_accuracy(trainer: SplitTrainer, comp: torch.Tensor, column: dict[int, int], gain: float,
                      true_ids: torch.Tensor, fake_ids: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    """Accuracy (percent) of the fused score on true caption vs counterfeit, per kind and their mean."""
    held, cap_img = trainer.held, trainer.cap_img
    img = cap_img[true_ids]
    cols = torch.tensor([column[int(i)] for i in img.tolist()], device=comp.device)
    scores = []
    for ids in (true_ids, fake_ids):
        text, mask = trainer.text_states.batch(ids, comp.device)
        joint = trainer.model.pair_logits(text, mask, comp[cols]).float().cpu()
        scores.append(gain * held.logits(ids, img, cap_img) + joint)
    right = (scores[0] > scores[1]).float() + 0.5 * (scores[0] == scores[1]).float()
    out = {}
    for kind in sorted(set(kinds)):
        sel = torch.tensor([k == kind for k in kinds])
        out[f"binding_{kind}"] = round(100.0 * float(right[sel].mean()), 2)
    out["binding"] = round(sum(out.values()) / len(out), 2)
    return out
