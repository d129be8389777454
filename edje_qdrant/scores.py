"""The one score vocabulary of search results (CLI, JSON, HTML, grid, HTTP, LangChain/LlamaIndex metadata).

- ``score``: what the results are sorted by. Re-ranked: ``rerank_score + fusion_weight * first_stage_score``;
  not re-ranked (``rerank_k=0``, or a hit whose re-ranking failed): ``first_stage_score``.
- ``first_stage_score``: cosine similarity of the ANN (first-stage) search.
- ``rerank_score``: the joint encoder's logit; None when not re-ranked.
``fusion_weight`` belongs to the model (``EdjeModel.fusion_weight``; 0 for models without fusion).
"""
from __future__ import annotations

import math
from typing import Any, Iterable


def fused_score(rerank_score: float, first_stage_score: float, fusion_weight: float) -> float:
    """``score`` of a re-ranked hit."""
    return float(rerank_score) + float(fusion_weight) * float(first_stage_score)


def score_formula(fusion_weight: float | None) -> str:
    """One line saying how ``score`` is formed, for legends of re-ranked lists (None: the weight is unknown). Plain
    ASCII ("x", as in ``search --help``): the contact sheet's built-in font has no "×"."""
    if fusion_weight is None:
        fused = "rerank + fusion weight x first-stage"
    elif fusion_weight:
        fused = f"rerank + {fusion_weight:.4g} x first-stage"
    else:
        fused = "rerank"
    return f"score = {fused} when re-ranked, = first-stage when not; results are sorted by score"


FIRST_STAGE_LEGEND = "score = first-stage (not re-ranked); results are sorted by score"


def infer_fusion_weight(rows: Iterable[tuple[Any, Any, Any]]) -> float | None:
    """The fusion weight behind (score, first_stage_score, rerank_score) rows, or None when no row tells it."""
    for score, first, rerank in rows:
        if None in (score, first, rerank) or not math.isfinite(first) or abs(first) < 1e-6:
            continue
        return round((float(score) - float(rerank)) / float(first), 4)
    return None
