"""Fast re-ranking recall on cached tokens (training validation and the ablation harness).

Given first-stage logits ``sim`` [C, I] (caption x image) and each caption's image, it re-ranks the top-k of each
row (text->image) and of each column (image->text) by ``sim + joint logit``, the score the Retriever uses. The
product-path numbers come from ``edje_qdrant.evaluate``; this module only avoids re-ingesting for every run.
"""
from __future__ import annotations

from typing import Any

import torch

from edje_qdrant.metrics import recalls
from edje_qdrant.train.text_states import TextStates

@torch.no_grad()
def _joint(model: Any, states: Any, cap_idx: torch.Tensor, comp: torch.Tensor, img_idx: torch.Tensor
           ) -> torch.Tensor:
    """Joint logits of pairs (caption cap_idx[p], comp[img_idx[p]]) -> [P] float32 on the CPU."""
    uniq, inv = torch.unique(cap_idx, return_inverse=True)
    text, mask = states.batch(uniq, comp.device)
    return model.pair_logits(text[inv.to(text.device)], mask[inv.to(text.device)],
                             comp[img_idx.to(comp.device)]).float().cpu()


def _first_hits(order: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """0-based rank of the first positive in each row of ``positive`` [R, k] (k when none)."""
    k = positive.shape[1]
    has = positive.any(1)
    first = positive.float().argmax(1)
    return torch.where(has, first, torch.full_like(first, k))


@torch.no_grad()
def rerank_recall(model: Any, captions: Any, sim: torch.Tensor, pos: torch.Tensor, comp: torch.Tensor,
                  k: int = 20, chunk: int = 64) -> dict[str, Any]:
    """R@1/5/10 first stage vs re-ranked, both directions; ``pos`` [C] = column of each caption's image,
    ``comp`` [I, m, d] the images' compressed tokens, ``captions`` texts or their ``TextStates``. Returns
    ``summary`` and per-query ranks."""
    c, i = sim.shape
    k = min(k, i)
    states = captions if isinstance(captions, TextStates) else TextStates(model, captions)
    ranks: dict[str, list[torch.Tensor]] = {"t2i_first": [], "t2i": [], "i2t_first": [], "i2t": []}
    for s in range(0, c, chunk):
        top = sim[s:s + chunk].topk(k, dim=1)
        rows = torch.arange(s, min(s + chunk, c))
        cap_idx = rows.view(-1, 1).expand(-1, k).flatten()
        logits = _joint(model, states, cap_idx, comp, top.indices.flatten()).view(-1, k)
        positive = top.indices == pos[rows].view(-1, 1)
        ranks["t2i_first"].append(_first_hits(top.indices, positive))
        order = (top.values + logits).argsort(dim=1, descending=True, stable=True)
        ranks["t2i"].append(_first_hits(order, positive.gather(1, order)))
    kc = min(k, c)
    simt = sim.t()
    for s in range(0, i, chunk):
        top = simt[s:s + chunk].topk(kc, dim=1)
        rows = torch.arange(s, min(s + chunk, i))
        img_idx = rows.view(-1, 1).expand(-1, kc).flatten()
        logits = _joint(model, states, top.indices.flatten(), comp, img_idx).view(-1, kc)
        positive = pos[top.indices] == rows.view(-1, 1)
        ranks["i2t_first"].append(_first_hits(top.indices, positive))
        order = (top.values + logits).argsort(dim=1, descending=True, stable=True)
        ranks["i2t"].append(_first_hits(order, positive.gather(1, order)))
    r = {key: torch.cat(v).numpy() for key, v in ranks.items()}
    ks = tuple(n for n in (1, 5, 10) if n <= k)
    summary: dict[str, float] = {}
    for direction in ("t2i", "i2t"):
        summary |= recalls(r[f"{direction}_first"], ks, f"{direction}_", "_first")
        summary |= recalls(r[direction], ks, f"{direction}_")
    return {"summary": summary, "ranks": r}
