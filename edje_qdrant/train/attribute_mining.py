"""Attribute-mined image negatives for text->image training lists.

For "a man in a red shirt" the useful negatives are photos whose captions name a shirt of another colour, or a
woman where a man is named: the same scene words, one attribute different. The index is built from the training
captions only; an image counts as showing an attribute when any of its captions names it.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from edje_qdrant.train.counterfeit import CaptionStats, colour_nouns, confusable, gender


class AttributeIndex:
    """Per image: the (colour, noun) pairs and genders its captions name; ``negatives`` mines other images."""

    def __init__(self, captions: Sequence[str], caption_image: Sequence[int], stats: CaptionStats) -> None:
        self.stats = stats
        self.pairs_of: dict[int, set[tuple[str, str]]] = defaultdict(set)
        self.genders_of: dict[int, set[str]] = defaultdict(set)
        self.with_noun: dict[str, set[int]] = defaultdict(set)
        self.with_gender: dict[str, set[int]] = defaultdict(set)
        for text, img in zip(captions, caption_image):
            for colour, noun in colour_nouns(text, stats):
                self.pairs_of[img].add((colour, noun))
                self.with_noun[noun].add(img)
            g = gender(text)
            if g:
                self.genders_of[img].add(g)
                self.with_gender[g].add(img)

    def negatives(self, caption: str, image: int) -> set[int]:
        """Images that contradict one attribute of ``caption`` (of ``image``): the caption's noun named with a
        clearly different colour and never with the caption's colour, or only the other gender named."""
        out: set[int] = set()
        for colour, noun in colour_nouns(caption, self.stats):
            for other in self.with_noun[noun]:
                named = {c for c, n in self.pairs_of[other] if n == noun}
                if not any(confusable(colour, c) for c in named):
                    out.add(other)
        g = gender(caption)
        if g:
            flip = "female" if g == "male" else "male"
            out |= {i for i in self.with_gender[flip] if self.genders_of[i] == {flip}}
        out.discard(image)
        return out


def mined_candidates(index: AttributeIndex, captions: Sequence[str], caption_rows: torch.Tensor,
                     caption_image: torch.Tensor, query_emb: torch.Tensor, item_emb: torch.Tensor,
                     allowed: torch.Tensor, pool: int) -> torch.Tensor:
    """Per caption row, up to ``pool`` attribute-mined images among the ``allowed`` ones, the ones the first
    stage ranks highest first; rows with fewer are padded with -1. Shape [R, pool]."""
    out = torch.full((len(caption_rows), pool), -1, dtype=torch.long)
    for r, c in enumerate(caption_rows.tolist()):
        mined = [i for i in index.negatives(captions[c], int(caption_image[c])) if allowed[r, i]]
        if not mined:
            continue
        cand = torch.tensor(mined)
        sims = item_emb[cand] @ query_emb[r]
        top = cand[sims.argsort(descending=True)[:pool]]
        out[r, : len(top)] = top
    return out
