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
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edje_qdrant.errors import InputError
from edje_qdrant.models.split_joint import SplitJointReranker, SplitJointConfig, TextStates, pool_patches
from edje_qdrant.train import checkpoint as ckpt
from edje_qdrant.train.attribute_mining import AttributeIndex, mined_candidates
from edje_qdrant.train.binding_lists import BindingSampler, CounterfeitSet, extend_tables, training_counterfeits
from edje_qdrant.train.counterfeit import CaptionStats
from edje_qdrant.train.common import autocast, cosine_lr
from edje_qdrant.train.crossfit import HeldOutScores, heldout_text_embeddings
from edje_qdrant.train.data import CaptionSet
from edje_qdrant.train.token_cache import TokenCache, view_folder
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
    from edje_qdrant.train.token_cache import colour_cache

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
        self.data, self.held, self.o = data, held, opts
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
        k = self.o.candidates - 1
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
            pick = pool[torch.randperm(len(pool), generator=g)[: self.o.mined]].tolist()
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
        self.model, self.data, self.tokens, self.held, self.o = model, data, tokens, held, opts
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

    def _image_tokens(self, images: torch.Tensor, views: list[str], train: bool) -> torch.Tensor:
        """Adapter output for unique (image, view) pairs [U, m', d] (m' < m with token dropout)."""
        patches = torch.empty((len(views),) + tuple(self.tokens[views[0]].shape[1:]), dtype=torch.float32)
        for v in set(views):
            rows = torch.tensor([n for n, w in enumerate(views) if w == v])
            patches[rows] = self.tokens[v][images[rows]].float()
        tokens = self.model.adapter(patches.to(self.device))
        if train and self.o.token_dropout > 0:  # drop a random subset of each image's tokens (as keys)
            keep = max(1, int(round(tokens.shape[1] * (1 - self.o.token_dropout))))
            idx = torch.rand(tokens.shape[:2]).argsort(dim=1)[:, :keep].to(self.device)
            tokens = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return tokens

    def group_logits(self, text_ids: list[int], pairs_img: torch.Tensor, pairs_txt: torch.Tensor,
                     views: list[str], train: bool) -> torch.Tensor:
        """Joint logits for pairs (row of ``text_ids`` (rows of the text-state cache), image index) -> [P]."""
        key = [(int(i), v) for i, v in zip(pairs_img.tolist(), views)]
        uniq = sorted(set(key))
        slot = {k: n for n, k in enumerate(uniq)}
        tok = self._image_tokens(torch.tensor([k[0] for k in uniq]), [k[1] for k in uniq], train)
        tok = tok[torch.tensor([slot[k] for k in key], device=self.device)]
        text, mask = self.text_states.batch(text_ids, self.device)
        return self.model.pair_logits(text[pairs_txt], mask[pairs_txt], tok)

    def draw_view(self, image: int, g: torch.Generator) -> str:
        """A random view of ``image`` among the options' views (``recolour`` only where its captions follow)."""
        view = self.o.views[int(torch.randint(len(self.o.views), (1,), generator=g))]
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
        image_sets = [("i2t", i2t[0], i2t[1], self.o.i2t_weight)]
        if binding is not None:
            image_sets.append(("binding", binding[0], binding[1], self.o.binding_weight))
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
    o, held = trainer.o, trainer.held
    folds = held.image_fold[sampler.images]
    fold = int(folds[torch.randint(len(folds), (1,), generator=g)])
    pool = sampler.images[folds == fold]
    imgs = pool[torch.randperm(len(pool), generator=g)[: o.late_batch]]
    rows = {int(i): r for r, i in enumerate(sampler.images.tolist())}
    caps = torch.stack([sampler.own_captions[rows[int(i)]][torch.randint(len(sampler.own_captions[rows[int(i)]]),
                                                                          (1,), generator=g)] for i in imgs]).flatten()
    views = [trainer.draw_view(int(i), g) for i in imgs]
    text_ids = [trainer.text_row(int(c), v) for c, v in zip(caps, views)]
    with autocast(trainer.device, trainer.bf16):
        tok = trainer._image_tokens(imgs, views, train=True)
    text, mask = trainer.text_states.batch(text_ids, trainer.device)
    late = trainer.model.late_scores(text, mask, tok)  # [B, B]
    first = held.scale[fold] * held.caption_emb[caps] @ held.image_emb[imgs].t()
    s_ = first.to(trainer.device) + late
    target = torch.arange(len(imgs), device=trainer.device)
    loss = 0.5 * (F.cross_entropy(s_, target) + F.cross_entropy(s_.t(), target))
    return {"total": loss, "acc_t2i": (s_.argmax(1) == target).float().mean()}


def param_groups(model: SplitJointReranker, o: SplitTrainOptions) -> list[dict[str, Any]]:
    groups: dict[str, list[torch.nn.Parameter]] = {"adapter": [], "head": [], "joint": [], "late": [],
                                                   "evidence": []}
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith("text_bert."):
            continue
        top = name.split(".")[0]
        groups["late" if top.startswith("late_") else top if top in groups else "joint"].append(p)
    lrs = {"adapter": o.adapter_lr, "head": o.head_lr, "joint": o.lr, "late": o.late_lr, "evidence": o.evidence_lr}
    return [{"params": ps, "lr": lrs[n], "base_lr": lrs[n], "weight_decay": o.weight_decay}
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
    from safetensors.torch import save_file

    from edje_qdrant.train.rerank_eval import rerank_recall

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    colour = images_dir if opts.colour else None
    if opts.colour and images_dir is None:
        raise InputError("colour=True needs the images folder (images_dir) to compute colour features")
    tokens = {v: load_patch_tokens(token_root, names, v, opts.layers, opts.patch_pool, colour_from=colour)
              for v in set(opts.views) | {"orig"}}
    train_imgs, val_imgs = split_train_val(held.image_fold, opts.val_images, opts.seed)
    attribute_index = AttributeIndex(data.captions, data.caption_image, CaptionStats(data.captions)) \
        if opts.mined else None
    sampler = GroupSampler(data, held, train_imgs, opts, attribute_index)
    text_data, text_held, binder, checks = data, held, None, None
    if opts.counterfeits:
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
    model = SplitJointReranker(opts.model_config()).to(device)
    model.init_joint_from_minilm()
    if opts.adapter_init == "first_stage":
        if first_stage_heads is None:
            raise InputError("adapter_init=first_stage needs the first stage's heads (image_head, text_proj)")
        model.init_adapter_from_first_stage(*first_stage_heads)
    trainer = SplitTrainer(model, text_data, tokens, text_held, opts, device, bf16, memo_dir=out.parent,
                           n_captions=len(data.captions))
    groups = param_groups(model, opts)
    if trainer.log_gain is not None:
        groups.append({"params": [trainer.log_gain], "lr": opts.head_lr, "base_lr": opts.head_lr,
                       "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    steps_per_epoch = len(sampler.captions) // opts.batch_captions
    total = opts.late_steps + max(1, int(steps_per_epoch * opts.epochs))
    val = _val_fn(trainer, tokens["orig"], val_imgs, rerank_recall, checks, len(data.captions))
    step, best, best_state, best_step, curve = 0, -1.0, None, 0, []
    ck = out / "split_reranker.ckpt"
    if resume and ck.is_file():
        state = ckpt.load_checkpoint(ck)
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        ckpt.set_rng_state(state["rng"])
        extra = state.get("extra") if isinstance(state.get("extra"), dict) else {}
        best = float(extra.get("best", -1.0))
        if trainer.log_gain is not None and "log_gain" in extra:
            with torch.no_grad():
                trainer.log_gain.fill_(float(extra["log_gain"]))
    base = val()
    curve.append({"step": step, **base})
    if best < 0:  # the starting point competes too: an update that never beats it is not kept
        best, best_state = _val_score(base), (model.trainable_state(), float(trainer.fusion_gain()))
    log.info("split reranker: %d steps, start val %s", total, base)
    g = torch.Generator().manual_seed(opts.seed * 7919 + step)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, desc="split reranker", unit="step")
    t0, pairs = time.time(), 0
    while step < total:
        epoch, b = divmod(max(0, step - opts.late_steps), steps_per_epoch)
        order = torch.randperm(len(sampler.captions), generator=torch.Generator().manual_seed(opts.seed + epoch))
        rows = order[b * opts.batch_captions:(b + 1) * opts.batch_captions]
        irows = torch.randint(len(sampler.images), (opts.batch_images,), generator=g)
        model.train()
        model.text_bert.eval()
        late_phase = step < opts.late_steps
        phase_step, phase_total = (step, opts.late_steps) if late_phase else (step - opts.late_steps,
                                                                               total - opts.late_steps)
        mult = cosine_lr(phase_step, phase_total, max(1, phase_total // 20))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mult
        if late_phase:
            parts = late_loss(trainer, sampler, g)
        else:
            binding = binder.groups(opts.binding_images, g) if binder is not None else None
            parts = trainer.loss(sampler.t2i_groups(rows, g), sampler.i2t_groups(irows, g), g, binding)
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
        opt.step()
        step += 1
        if not late_phase:  # joint-encoder pairs (the in-batch late steps score B x B cheaply, not counted)
            pairs += opts.candidates * (opts.batch_captions + opts.batch_images
                                        + (opts.binding_images if binder is not None else 0))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total'].item():.3f}", acc=f"{parts['acc_t2i'].item():.2f}")
        if step % opts.eval_every == 0 or step == total:
            v = val()
            curve.append({"step": step, **v})
            log.info("step %d val %s", step, v)
            if _val_score(v) > best:
                best, best_state, best_step = _val_score(v), (model.trainable_state(),
                                                              float(trainer.fusion_gain())), step
            ckpt.save_checkpoint(ck, model=model.trainable_state(), optimizer=opt.state_dict(), step=step,
                                 epoch=epoch, extra={"best": best, "log_gain": float(trainer.fusion_gain().log())})
    if bar is not None:
        bar.close()
    elapsed = time.time() - t0
    state, gain = best_state if best_state is not None else (model.trainable_state(), float(trainer.fusion_gain()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    config = {"reranker": opts.model_config().to_dict(), "options": asdict(opts), "steps": step,
              "best_step": best_step, "fusion_gain": gain,
              "train_seconds": round(elapsed, 1), "pairs_per_second": round(pairs / max(elapsed, 1e-9), 1),
              "val_curve": curve}
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return config


def _val_score(v: dict[str, float]) -> float:
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


def _val_fn(trainer: SplitTrainer, tokens: torch.Tensor, val_imgs: torch.Tensor, rerank_recall: Any,
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
        gain = float(trainer.fusion_gain())
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
