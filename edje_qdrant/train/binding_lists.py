"""Counterfeit captions as training lists of the split reranker (image -> [true caption, its counterfeits, hard
captions]) and the tables that let the trainer treat a counterfeit like any other caption.

Counterfeits are made per cross-fitting fold: the captions of one fold's images, balanced against a blind prior
(and with bigram statistics) built from the other folds' captions, so the prior has never read the caption it
judges. Counterfeit ``j`` gets the caption id ``len(captions) + j`` in the extended caption table, the image of
the caption it was made from, and a first-stage embedding from the fold model that never saw that image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from edje_qdrant.train.counterfeit import KINDS, binding_pairs
from edje_qdrant.train.crossfit import HeldOutScores
from edje_qdrant.train.data import CaptionSet


@dataclass
class CounterfeitSet:
    """Counterfeit texts, the caption each was made from (``source``) and its kind."""

    texts: list[str]
    source: list[int]
    kinds: list[str]

    def by_caption(self, offset: int) -> dict[int, list[int]]:
        """Caption id -> the extended ids (``offset + j``) of its counterfeits."""
        out: dict[int, list[int]] = {}
        for j, c in enumerate(self.source):
            out.setdefault(c, []).append(offset + j)
        return out


def training_counterfeits(data: CaptionSet, image_fold: torch.Tensor, seed: int = 0,
                          kinds: Sequence[str] = KINDS) -> CounterfeitSet:
    """Every counterfeit of every caption, balanced per kind and fold against the other folds' prior."""
    cap_fold = image_fold[torch.tensor(data.caption_image)]
    texts, source, found_kinds = [], [], []
    for f in sorted(set(image_fold.tolist())):
        mine = (cap_fold == f).nonzero().flatten().tolist()
        others = [data.captions[c] for c in (cap_fold != f).nonzero().flatten().tolist()]
        pairs = binding_pairs([data.captions[c] for c in mine], others, seed=seed + f, kinds=kinds,
                              one_per_kind=False)
        for p in pairs:
            texts.append(p.fake)
            source.append(mine[p.caption])
            found_kinds.append(p.kind)
    return CounterfeitSet(texts, source, found_kinds)


def extend_tables(data: CaptionSet, held: HeldOutScores, counterfeits: CounterfeitSet,
                  counterfeit_emb: torch.Tensor) -> tuple[CaptionSet, HeldOutScores]:
    """The caption set and first-stage scores with the counterfeits appended as captions of their images."""
    ext = CaptionSet(images=data.images,
                     caption_image=list(data.caption_image) + [data.caption_image[c] for c in counterfeits.source],
                     captions=list(data.captions) + list(counterfeits.texts))
    emb = torch.cat([held.caption_emb, counterfeit_emb.to(held.caption_emb.dtype)]) if counterfeits.texts \
        else held.caption_emb
    return ext, HeldOutScores(emb, held.image_emb, held.image_fold, held.scale)


class BindingSampler:
    """Image-centric lists: column 0 a true caption, column 1 one of its counterfeits, then up to ``per_list - 1``
    more of its counterfeits, then hard captions of the image's fold (``hard_pool``, rows of ``images``) up to the
    list width. The counterfeit of column 1 is drawn kind first, with probability proportional to the square root of
    the kind's count, so rare kinds (colours swapped) are seen more often than their share without being repeated
    as often as common ones."""

    def __init__(self, counterfeits: CounterfeitSet, n_captions: int, caption_image: Sequence[int],
                 images: torch.Tensor, hard_pool: torch.Tensor, per_list: int, width: int) -> None:
        trained = set(images.tolist())
        self.of = {c: ids for c, ids in counterfeits.by_caption(n_captions).items() if caption_image[c] in trained}
        self.by_kind: dict[str, list[tuple[int, int]]] = {}
        for j, (c, kind) in enumerate(zip(counterfeits.source, counterfeits.kinds)):
            if c in self.of:
                self.by_kind.setdefault(kind, []).append((c, n_captions + j))
        self.kinds = sorted(self.by_kind)
        counts = torch.tensor([len(self.by_kind[k]) for k in self.kinds], dtype=torch.float)
        self.kind_p = counts.sqrt() / counts.sqrt().sum() if len(counts) else counts
        self.caption_image = caption_image
        self.image_row = {int(i): r for r, i in enumerate(images.tolist())}
        self.hard_pool = hard_pool
        self.per_list, self.width = per_list, width

    def __len__(self) -> int:
        return len(self.of)

    def groups(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index [n], caption ids [n, width]) for ``n`` drawn counterfeits and their true captions."""
        imgs, rows = [], []
        for k in torch.multinomial(self.kind_p, n, replacement=True, generator=g).tolist():
            items = self.by_kind[self.kinds[k]]
            c, fake = items[int(torch.randint(len(items), (1,), generator=g))]
            others = [f for f in self.of[c] if f != fake]
            order = torch.randperm(len(others), generator=g)[: self.per_list - 1].tolist()
            row = [c, fake] + [others[i] for i in order]
            pool = self.hard_pool[self.image_row[self.caption_image[c]]]
            extra = pool[torch.randperm(len(pool), generator=g)].tolist()
            row += [x for x in extra if x != c][: self.width - len(row)]
            imgs.append(self.caption_image[c])
            rows.append(row)
        return torch.tensor(imgs), torch.tensor(rows)
