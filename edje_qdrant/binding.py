"""Binding benchmark through the user path: does the search score tell a true caption from a counterfeit that
changes one attribute ("green slide" -> "yellow slide", man <-> woman, ...)?

The split's images are ingested (``ingest``) and queried with the ``Retriever`` users call. Pairs are built from
the split's captions (``train.counterfeit``), balanced so that a blind trigram prior of the training captions
scores 50 % per kind. Each (image, true caption, counterfeit) is scored three ways:

- ``first_stage``: cosine of the caption's text vector and the image's stored ``clip`` vector;
- ``reranked``: the default search score, ``rerank_score + fusion_weight x cosine`` (``Retriever.score_captions``
  gives the logits);
- ``prior``: the blind text prior (50 % by construction).

Alongside: text->image R@1 over all the split's images for the captions that name a colour or a person, first
stage vs re-ranked, how often re-ranking changes the top 1 and the top 5, and the whole-split recall of
``evaluate.summarise``. Intervals: percentile bootstrap over pairs / queries (``paired_bootstrap_ci``).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .evaluate import (PerQuery, Progress, first_stage_ranks, ingested_split, measure_runs, paired_bootstrap_ci,
                       query_ranks, query_subset, rerank_order, summarise)
from .models.base import EdjeModel
from .scores import fused_score
from .train.counterfeit import KINDS, BindingPair, attributes, binding_pairs
from .train.data import caption_set, read_captions

TEXT_BATCH = 256


def evaluate_binding(captions: str | Path, images: str | Path, split: str = "dev",
                     model: EdjeModel | str = "tiny-random", *, rerank_k: int = 100,
                     store_path: str | Path | None = None, dtype: str = "fp16", max_queries: int | None = None,
                     seed: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """The binding report of ``split`` (pairs from its captions; the prior from the ``train`` split's captions):
    accuracy per kind three ways, attribute-query recall, top-1/top-5 change rates, and whole-split recall."""
    rows = read_captions(captions)
    train_captions = caption_set(rows, "train").captions
    with ingested_split(captions, images, split, model, store_path=store_path, dtype=dtype) as split_store:
        pairs = binding_pairs(split_store.data.captions, train_captions, seed=seed)
        scored = score_pairs(split_store.retriever, split_store.ids, split_store.data.caption_image, pairs,
                             progress)
        runs = measure_runs(split_store, max(rerank_k, 10), max_queries, progress)
        chosen = query_subset(len(split_store.data.captions), max_queries)
        named = [attributes(split_store.data.captions[int(c)]) for c in chosen]
    weight = runs.fusion_weight
    return {
        "split": split, "rerank_k": rerank_k, "fusion_weight": weight,
        "binding": binding_table(pairs, scored, weight),
        "attribute_queries": {
            "colour_or_person": recall_subset(runs.t2i, [bool(n) for n in named], rerank_k, weight),
            "colour": recall_subset(runs.t2i, ["colour" in n for n in named], rerank_k, weight),
            "person": recall_subset(runs.t2i, ["person" in n for n in named], rerank_k, weight),
        },
        "changes": {
            "all": change_rates(runs.t2i, rerank_k, weight),
            "colour_or_person": change_rates([q for q, n in zip(runs.t2i, named) if n], rerank_k, weight),
        },
        "overall": summarise(runs, [rerank_k]),
        "bootstrap": {"resamples": 2000, "seed": 0, "resampled": "pairs (binding), captions (queries)"},
    }


def score_pairs(retriever: Any, ids: Sequence[str], caption_image: Sequence[int], pairs: Sequence[BindingPair],
                progress: Progress | None = None) -> dict[str, np.ndarray]:
    """First-stage cosines and joint logits of each pair's true and counterfeit caption against the true
    caption's image: arrays ``first_true``, ``first_fake``, ``logit_true``, ``logit_fake`` (float64)."""
    texts = sorted({p.true for p in pairs} | {p.fake for p in pairs})
    row = {t: i for i, t in enumerate(texts)}
    model = retriever.model
    vecs = np.concatenate([model.embed_texts(texts[i:i + TEXT_BATCH]) for i in range(0, len(texts), TEXT_BATCH)]
                          ) if texts else np.zeros((0, model.clip_dim), np.float32)
    per_image: dict[int, list[str]] = defaultdict(list)
    for p in pairs:
        per_image[caption_image[p.caption]] += [p.true, p.fake]
    image_ids = [ids[i] for i in per_image]
    points = {h.id: h for h in retriever.store.retrieve(retriever.collection, image_ids, [], with_vector=True)}
    cosine: dict[tuple[int, str], float] = {}
    logit: dict[tuple[int, str], float] = {}
    for n, (img, group) in enumerate(per_image.items()):
        group = list(dict.fromkeys(group))
        vec = np.asarray(points[ids[img]].vector, dtype=np.float32)
        for t, lg in zip(group, retriever.score_captions(ids[img], group).tolist()):
            cosine[(img, t)] = float(vecs[row[t]] @ vec)
            logit[(img, t)] = float(lg)
        if progress:
            progress("binding pairs", n + 1, len(per_image))
    out: dict[str, list[float]] = defaultdict(list)
    for p in pairs:
        img = caption_image[p.caption]
        for side, text in (("true", p.true), ("fake", p.fake)):
            out[f"first_{side}"].append(cosine[(img, text)])
            out[f"logit_{side}"].append(logit[(img, text)])
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _correct(true: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """1 where the true caption scores higher, 0.5 on a tie, 0 where the counterfeit wins."""
    return np.where(true > fake, 1.0, np.where(true == fake, 0.5, 0.0))


def _mean_ci(values: np.ndarray) -> dict[str, Any]:
    """Mean (percent) with a percentile bootstrap 95 % interval."""
    mean, (lo, hi) = paired_bootstrap_ci(np.zeros_like(values), values)
    return {"percent": _pct(mean), "ci95": [_pct(lo), _pct(hi)]}


def _pct(fraction: float) -> float:
    return round(100.0 * fraction, 1) + 0.0


def _fused(scored: dict[str, np.ndarray], side: str, weight: float) -> np.ndarray:
    """The default search score of one side of every pair."""
    return np.array([fused_score(lg, c, weight) for lg, c in zip(scored[f"logit_{side}"], scored[f"first_{side}"])])


def binding_table(pairs: Sequence[BindingPair], scored: dict[str, np.ndarray], weight: float) -> dict[str, Any]:
    """Per kind: pairs, accuracy of the first stage, the default re-ranked score (``weight``: the model's fusion
    weight) and the prior, each with a 95 % interval, and re-ranked minus first stage with a paired interval."""
    kinds = np.array([p.kind for p in pairs])
    first = _correct(scored["first_true"], scored["first_fake"])
    fused = _correct(_fused(scored, "true", weight), _fused(scored, "fake", weight))
    prior = _correct(np.array([p.prior_true for p in pairs]), np.array([p.prior_fake for p in pairs]))
    table: dict[str, Any] = {}
    for kind in KINDS:
        sel = kinds == kind
        if not sel.any():
            continue
        delta, (lo, hi) = paired_bootstrap_ci(first[sel], fused[sel])
        table[kind] = {"pairs": int(sel.sum()), "first_stage": _mean_ci(first[sel]),
                       "reranked": _mean_ci(fused[sel]), "prior": _mean_ci(prior[sel]),
                       "delta": {"points": _pct(delta), "ci95": [_pct(lo), _pct(hi)]}}
    return table


def recall_subset(t2i: Sequence[PerQuery], mask: Sequence[bool], k: int, weight: float) -> dict[str, Any]:
    """Text->image R@1 of the masked queries: first stage, re-ranked (default score), and the paired gain."""
    chosen = [q for q, m in zip(t2i, mask) if m]
    if not chosen:
        return {"queries": 0}
    first, reranked = first_stage_ranks(chosen) < 1, query_ranks(chosen, k, weight) < 1
    delta, (lo, hi) = paired_bootstrap_ci(first, reranked)
    return {"queries": len(chosen), "first_stage_r1": _pct(first.mean()), "reranked_r1": _pct(reranked.mean()),
            "delta_r1": {"points": _pct(delta), "ci95": [_pct(lo), _pct(hi)]}}


def change_rates(t2i: Sequence[PerQuery], k: int, weight: float) -> dict[str, Any]:
    """Share of queries whose top 1 / top-5 set differs between the first stage and the re-ranked list."""
    top1, top5 = [], []
    for first, logits, _ in t2i:
        order = rerank_order(first, logits, k, weight)  # indices into first-stage order: 0 is its top 1
        top1.append(float(order[0] != 0) if order.size else 0.0)
        top5.append(float(set(order[:5].tolist()) != set(range(min(5, order.size)))))
    if not top1:
        return {"queries": 0}
    return {"queries": len(top1), "top1_changed": _mean_ci(np.asarray(top1)),
            "top5_changed": _mean_ci(np.asarray(top5))}
