"""Recall@K through the user path: ingest a split into an embedded store, then query with the Retriever.

Text->image: each caption is one ``Retriever.search(caption, k=K, rerank_k=K)`` with K the largest rerank_k; the
first-stage ranking and the re-ranking of the top-k candidates for every smaller k are read off its results
(both scores are returned per candidate, and a rerank of the top k is the same logits restricted to them).
Image->text: the image's stored `clip` vector ranks all captions of the split (first stage), then
``Retriever.score_captions`` re-ranks the top K captions with the same joint encoder.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError
from .ingest import ingest
from .ingest.ids import point_id, sha256_file
from .models import load_model
from .models.base import EdjeModel
from .retriever import Retriever
from .store import open_store
from .train.data import caption_set, read_captions

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


@dataclass
class Ranks:
    """0-based rank of the first correct item per query (a large number when it is not in the list)."""

    first_stage: np.ndarray  # [Q]
    reranked: dict[int, np.ndarray]  # rerank_k -> [Q]
    fused_inputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per query: first-stage scores, logits, is_positive


def recalls(ranks: np.ndarray) -> dict[str, float]:
    """Recall@1/5/10 in percent from 0-based ranks."""
    return {f"r{k}": round(float((ranks < k).mean() * 100.0), 2) for k in RECALL_KS}


def rerank_ranks(first: np.ndarray, logits: np.ndarray, positive: np.ndarray, k: int, weight: float = 0.0) -> int:
    """Rank of the first positive after re-ranking the top-``k`` first-stage candidates by logit + weight*first.

    Candidates come in any order; ties are broken by first-stage score. Returns a large number if no positive
    is among the top k by first-stage score.
    """
    order = np.argsort(-first, kind="stable")[:k]
    score = logits[order] + weight * first[order]
    reordered = order[np.lexsort((-first[order], -score))]
    hits = np.flatnonzero(positive[reordered])
    return int(hits[0]) if hits.size else 1_000_000


def first_stage_rank(first: np.ndarray, positive: np.ndarray) -> int:
    hits = np.flatnonzero(positive[np.argsort(-first, kind="stable")])
    return int(hits[0]) if hits.size else 1_000_000


def _table(per_query: list[tuple[np.ndarray, np.ndarray, np.ndarray]], ks: Sequence[int], weight: float
           ) -> dict[str, dict[str, float]]:
    return {
        str(k): recalls(np.array([rerank_ranks(f, lg, p, k, weight) for f, lg, p in per_query]))
        for k in ks
    }


def tune_fusion_weight(per_query: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int,
                       grid: Sequence[float] = tuple(np.round(np.arange(0.0, 40.01, 1.0), 2))) -> float:
    """Weight of the first-stage score that maximises mean R@1+R@5 (re-ranking the top k) on these queries."""
    best, best_w = -1.0, 0.0
    for w in grid:
        ranks = np.array([rerank_ranks(f, lg, p, k, w) for f, lg, p in per_query])
        value = float((ranks < 1).mean() + (ranks < 5).mean())
        if value > best + 1e-12:
            best, best_w = value, float(w)
    return best_w


def _link_split(images_dir: Path, names: list[str], folder: Path) -> None:
    missing = [n for n in names if not (images_dir / n).is_file()]
    if missing:
        raise InputError(f"{len(missing)} images of the split are missing from {images_dir} (first: {missing[0]}); "
                         "pass the --images folder that holds them")
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        link = folder / n
        if not link.exists():
            os.symlink((images_dir / n).resolve(), link)


def evaluate(
    captions: str | Path,
    images: str | Path,
    split: str = "dev",
    model: EdjeModel | str = "tiny-random",
    *,
    rerank_ks: Sequence[int] = (10, 20, 50),
    store_path: str | Path | None = None,
    dtype: str = "fp16",
    max_queries: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Ingest the split's images, then measure text->image and image->text Recall@1/5/10 (percent) for the first
    stage and re-ranked at each rerank_k, plus a fusion weight tuned on the first half of the queries and
    reported on the second half. ``max_queries`` evaluates an evenly spaced subset of captions/images."""
    ks = sorted({int(k) for k in rerank_ks})
    if not ks or ks[0] < 1:
        raise InputError(f"--rerank-k values must be positive integers, got {list(rerank_ks)}")
    images_dir = Path(images)
    data = caption_set(read_captions(captions), split)
    edje_model = load_model(model) if isinstance(model, str) else model
    k_max = max(ks + [max(RECALL_KS)])
    with tempfile.TemporaryDirectory(prefix="edje-eval-") as tmp:
        link_dir = Path(tmp) / split
        _link_split(images_dir, data.images, link_dir)
        store = open_store(path=str(store_path or Path(tmp) / "store"))
        collection = f"eval-{split}-{dtype}"
        try:
            report = ingest(link_dir, store, edje_model, collection, dtype=dtype)
            if report.failed:
                raise InputError(f"{report.failed} images of the split failed to ingest: {report.failures[:3]}")
            ids = [point_id(sha256_file(images_dir / n)[0]) for n in data.images]
            retriever = Retriever(store, collection, edje_model)
            t2i, seconds = _text_to_image(retriever, data, ids, k_max, max_queries, progress)
            i2t = _image_to_text(retriever, data, ids, k_max, max_queries, progress)
        finally:
            store.close()
    return _summary(t2i, i2t, ks, seconds, report.ingested + report.skipped_existing)


def _subset(n: int, max_queries: int | None) -> np.ndarray:
    if not max_queries or max_queries >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_queries).round().astype(int))


def _text_to_image(retriever: Retriever, data: Any, ids: list[str], k_max: int, max_queries: int | None,
                   progress: Callable[[str, int, int], None] | None) -> tuple[list[Any], float]:
    index_of = {pid: i for i, pid in enumerate(ids)}
    per_query = []
    elapsed = 0.0
    chosen = _subset(len(data.captions), max_queries)
    for n, q in enumerate(chosen):
        start = time.perf_counter()
        results = retriever.search(data.captions[q], k=k_max, rerank_k=k_max)
        elapsed += time.perf_counter() - start
        first = np.array([r.first_stage_score for r in results], dtype=np.float64)
        logits = np.array([r.rerank_score if r.rerank_score is not None else -1e9 for r in results])
        positive = np.array([index_of.get(r.id) == data.caption_image[q] for r in results])
        per_query.append((first, logits, positive))
        if progress:
            progress("text->image", n + 1, len(chosen))
    return per_query, elapsed / max(len(chosen), 1)


def _image_to_text(retriever: Retriever, data: Any, ids: list[str], k_max: int, max_queries: int | None,
                   progress: Callable[[str, int, int], None] | None) -> list[Any]:
    caption_vecs = np.concatenate([
        retriever.model.embed_texts(data.captions[i:i + 256]) for i in range(0, len(data.captions), 256)
    ])
    hits = {h.id: h for h in retriever.store.retrieve(retriever.collection, ids, [], with_vector=True)}
    caption_image = np.asarray(data.caption_image)
    per_query = []
    chosen = _subset(len(data.images), max_queries)
    for n, img in enumerate(chosen):
        vec = np.asarray(hits[ids[img]].vector, dtype=np.float32)
        sims = caption_vecs @ vec
        top = np.argsort(-sims, kind="stable")[:k_max]
        logits = retriever.score_captions(ids[img], [data.captions[c] for c in top])
        per_query.append((sims[top].astype(np.float64), logits.astype(np.float64), caption_image[top] == img))
        if progress:
            progress("image->text", n + 1, len(chosen))
    return per_query


def _summary(t2i: list[Any], i2t: list[Any], ks: list[int], seconds: float, n_images: int) -> dict[str, Any]:
    def first(per_query: list[Any]) -> dict[str, float]:
        return recalls(np.array([first_stage_rank(f, p) for f, _, p in per_query]))

    out: dict[str, Any] = {"first_stage": {}, "reranked": {}, "fused": {}, "seconds_per_query": round(seconds, 4),
                           "queries": {"t2i": len(t2i), "i2t": len(i2t)}, "images": n_images}
    for name, per_query in (("t2i", t2i), ("i2t", i2t)):
        for key, value in first(per_query).items():
            out["first_stage"][f"{name}_{key}"] = value
        for k, table in _table(per_query, ks, 0.0).items():
            out["reranked"].setdefault(k, {}).update({f"{name}_{m}": v for m, v in table.items()})
        half = len(per_query) // 2
        tune, held = per_query[:half] or per_query, per_query[half:] or per_query
        for k in ks:
            w = tune_fusion_weight(tune, k)
            table = _table(held, [k], w)[str(k)]
            held_plain = _table(held, [k], 0.0)[str(k)]
            fused = out["fused"].setdefault(str(k), {})
            fused[f"{name}_weight"] = w
            fused.update({f"{name}_{m}": v for m, v in table.items()})
            fused.update({f"{name}_{m}_unfused_same_half": v for m, v in held_plain.items()})
            fused.update({f"{name}_{m}_first_stage_same_half": v for m, v in first(held).items()})
    return out
