"""Recall@K through the user path: ingest a split into an embedded store, then query with the Retriever.

Text->image: each caption is one ``Retriever.search(caption, k=K, rerank_k=K)`` with K the largest rerank_k; its
results are put back in first-stage order, and the re-ranking of the top k candidates for every k is recomputed
from the returned first-stage scores and logits (a rerank of the top k is the same logits restricted to them).
Image->text: the image's stored `clip` vector ranks all captions of the split (first stage), then
``Retriever.score_captions`` re-ranks the top K captions with the same joint encoder.

Scores reported per rerank_k:

- ``reranked``: the model's default score, exactly what ``Retriever.search`` sorts by (logit +
  ``model.fusion_weight`` x first-stage cosine, ties in first-stage order, failed re-ranks kept in their slot);
  the weight is recorded as ``fusion_weight``.
- ``logit_only``: the joint-encoder logit alone (weight 0).
- ``fused_tuned``: a weight tuned on the first half of the queries, scored on the second half.
- ``delta_r1``: R@1 of ``reranked`` minus R@1 of the first stage, in percentage points, with a paired bootstrap
  95 % interval over queries (see ``paired_bootstrap_ci``).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import InputError
from .ingestion import ingest
from .ingestion.ids import sha256_file
from .metrics import RECALL_KS, recalls
from .models import load_model
from .models.base import EdjeModel
from .retriever import Retriever
from .schema import point_id
from .store import open_store
from .train.data import CaptionSet, caption_set, read_captions

log = logging.getLogger(__name__)

MISS = 1_000_000  # rank of a query whose positive is not in the list
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

# One query: first-stage scores, logits (NaN where the re-rank failed) and is_positive, in first-stage order.
PerQuery = tuple[np.ndarray, np.ndarray, np.ndarray]
Progress = Callable[[str, int, int], None]


@dataclass
class Runs:
    """Per-query scores of one evaluation run, what ``summarise`` turns into the JSON summary."""

    t2i: list[PerQuery]
    i2t: list[PerQuery]
    fusion_weight: float  # the model's default first-stage weight (what Retriever.search applies)
    seconds_per_query: float  # mean wall time of one text->image search
    images: int


def rerank_order(first: np.ndarray, logits: np.ndarray, k: int, weight: float) -> np.ndarray:
    """Indices of the top-``k`` first-stage candidates in the order ``Retriever.search`` returns them.

    Score = logit + weight * first (float64, as the Retriever computes it); ties keep first-stage order; a
    candidate with a non-finite logit (failed re-rank) keeps its first-stage slot.
    """
    order = np.argsort(-first, kind="stable")[:k]
    ok = np.isfinite(logits[order])
    score = logits[order][ok] + weight * first[order][ok]
    out = order.copy()
    out[ok] = order[ok][np.argsort(-score, kind="stable")]
    return out


def rerank_ranks(first: np.ndarray, logits: np.ndarray, positive: np.ndarray, k: int, weight: float = 0.0) -> int:
    """0-based rank of the first positive after re-ranking the top ``k`` (``rerank_order``); MISS if absent."""
    hits = np.flatnonzero(positive[rerank_order(first, logits, k, weight)])
    return int(hits[0]) if hits.size else MISS


def first_stage_rank(first: np.ndarray, positive: np.ndarray) -> int:
    """0-based rank of the first positive in first-stage order; MISS if absent."""
    hits = np.flatnonzero(positive[np.argsort(-first, kind="stable")])
    return int(hits[0]) if hits.size else MISS


def query_ranks(per_query: Sequence[PerQuery], k: int, weight: float) -> np.ndarray:
    """Rank of the first positive per query after re-ranking the top ``k`` with this first-stage weight."""
    return np.array([rerank_ranks(f, lg, p, k, weight) for f, lg, p in per_query], dtype=np.int64)


def first_stage_ranks(per_query: Sequence[PerQuery]) -> np.ndarray:
    """Rank of the first positive per query in the first stage."""
    return np.array([first_stage_rank(f, p) for f, _, p in per_query], dtype=np.int64)


def tune_fusion_weight(per_query: Sequence[PerQuery], k: int,
                       grid: Sequence[float] = tuple(np.round(np.arange(0.0, 40.01, 1.0), 2))) -> float:
    """Weight of the first-stage score that maximises mean R@1+R@5 (re-ranking the top k) on these queries."""
    best, best_w = -1.0, 0.0
    for w in grid:
        ranks = query_ranks(per_query, k, float(w))
        value = float((ranks < 1).mean() + (ranks < 5).mean())
        if value > best + 1e-12:
            best, best_w = value, float(w)
    return best_w


def paired_bootstrap_ci(a_hits: Sequence[float] | np.ndarray, b_hits: Sequence[float] | np.ndarray,
                        n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, tuple[float, float]]:
    """Mean of ``b - a`` over paired queries and its percentile bootstrap 95 % interval.

    ``a_hits`` / ``b_hits`` hold one value per query for two systems on the same queries (e.g. 1.0 where the
    correct item is ranked first, else 0.0), so the mean difference is the R@1 difference as a fraction. Each of
    the ``n`` resamples draws len(a) queries with replacement and keeps the pairing; the interval is the 2.5th and
    97.5th percentile of the resampled mean differences. ``seed`` fixes the draws, so the result is reproducible.

    Queries are assumed independent. For text->image they are captions, and the (typically 5) captions of one
    image are not independent; resampling is nevertheless done by caption, not by image, so the interval is
    somewhat narrower than a by-image (cluster) bootstrap would give.
    """
    a = np.asarray(a_hits, dtype=np.float64)
    b = np.asarray(b_hits, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    if a.size == 0 or n < 1:
        return 0.0, (0.0, 0.0)
    diff = b - a
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for start in range(0, n, 256):  # blocks bound the memory: 256 x len(a) indices at a time
        idx = rng.integers(0, diff.size, size=(min(256, n - start), diff.size))
        means[start:start + len(idx)] = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), (float(lo), float(hi))


def _link_split(images_dir: Path, names: list[str], folder: Path) -> None:
    """Symlink the split's images into ``folder`` (InputError naming the first missing one)."""
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
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Ingest the split's images, then measure text->image and image->text Recall@1/5/10 (percent): first stage,
    and at each rerank_k re-ranked with the model's default score, logit only and with a half-tuned fusion
    weight, plus the R@1 gain with a paired bootstrap 95 % interval (see ``summarise``). ``max_queries``
    evaluates an evenly spaced subset of captions/images; None (the default) evaluates all of them."""
    ks = _check_ks(rerank_ks)
    runs = collect(captions, images, split, model, k_max=max(ks + [max(RECALL_KS)]), store_path=store_path,
                   dtype=dtype, max_queries=max_queries, progress=progress)
    return summarise(runs, ks)


def _check_ks(rerank_ks: Sequence[int]) -> list[int]:
    """Sorted distinct rerank_k values; InputError unless all are positive."""
    ks = sorted({int(k) for k in rerank_ks})
    if not ks or ks[0] < 1:
        raise InputError(f"--rerank-k values must be positive integers, got {list(rerank_ks)}")
    return ks


def collect(
    captions: str | Path,
    images: str | Path,
    split: str,
    model: EdjeModel | str,
    *,
    k_max: int,
    store_path: str | Path | None = None,
    dtype: str = "fp16",
    max_queries: int | None = None,
    progress: Progress | None = None,
) -> Runs:
    """Ingest the split into a store (``store_path`` or a temporary one) and score every query's top ``k_max``."""
    with ingested_split(captions, images, split, model, store_path=store_path, dtype=dtype) as split_store:
        return measure_runs(split_store, k_max, max_queries, progress)


@dataclass
class SplitStore:
    """A split ingested through the user path: its captions, the Retriever over its collection, and the point id
    of each of its images (``ids[i]`` for ``data.images[i]``)."""

    data: CaptionSet
    retriever: Retriever
    ids: list[str]
    images: int


@contextmanager
def ingested_split(captions: str | Path, images: str | Path, split: str, model: EdjeModel | str, *,
                   store_path: str | Path | None = None, dtype: str = "fp16") -> Iterator[SplitStore]:
    """Ingest the split's images (``ingest``, the user path) into ``store_path`` or a temporary store and yield a
    ``SplitStore``; the store is closed on exit."""
    images_dir = Path(images)
    data = caption_set(read_captions(captions), split)
    edje_model = load_model(model) if isinstance(model, str) else model
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
            yield SplitStore(data, Retriever(store, collection, edje_model), ids,
                             report.ingested + report.skipped_existing)
        finally:
            store.close()


def measure_runs(split_store: SplitStore, k_max: int, max_queries: int | None = None,
                 progress: Progress | None = None) -> Runs:
    """Every (or ``max_queries`` evenly spaced) caption as a text query and image as an image->text query."""
    retriever, data, ids = split_store.retriever, split_store.data, split_store.ids
    t2i, seconds = _text_to_image(retriever, data, ids, k_max, max_queries, progress)
    i2t = _image_to_text(retriever, data, ids, k_max, max_queries, progress)
    return Runs(t2i, i2t, float(retriever.model.fusion_weight), seconds, split_store.images)


def query_subset(n: int, max_queries: int | None) -> np.ndarray:
    """All indices, or ``max_queries`` evenly spaced ones."""
    if not max_queries or max_queries >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_queries).round().astype(int))


def _text_to_image(retriever: Retriever, data: Any, ids: list[str], k_max: int, max_queries: int | None,
                   progress: Progress | None) -> tuple[list[PerQuery], float]:
    """One ``search(caption, k=k_max, rerank_k=k_max)`` per caption, back in first-stage order; mean seconds."""
    index_of = {pid: i for i, pid in enumerate(ids)}
    per_query = []
    elapsed = 0.0
    chosen = query_subset(len(data.captions), max_queries)
    for n, q in enumerate(chosen):
        start = time.perf_counter()
        results = retriever.search(data.captions[q], k=k_max, rerank_k=k_max)
        elapsed += time.perf_counter() - start
        first = np.array([r.first_stage_score for r in results], dtype=np.float64)
        logits = np.array([np.nan if r.rerank_score is None else r.rerank_score for r in results], dtype=np.float64)
        positive = np.array([index_of.get(r.id) == data.caption_image[q] for r in results], dtype=bool)
        # First-stage order; equal first-stage scores keep the Retriever's order, which is what it breaks ties by.
        order = np.argsort(-first, kind="stable")
        per_query.append((first[order], logits[order], positive[order]))
        if progress:
            progress("text->image", n + 1, len(chosen))
    return per_query, elapsed / max(len(chosen), 1)


def _image_to_text(retriever: Retriever, data: Any, ids: list[str], k_max: int, max_queries: int | None,
                   progress: Progress | None) -> list[PerQuery]:
    """Per image: its `clip` vector ranks all captions, ``score_captions`` scores the top ``k_max``."""
    caption_vecs = np.concatenate([
        retriever.model.embed_texts(data.captions[i:i + 256]) for i in range(0, len(data.captions), 256)
    ])
    hits = {h.id: h for h in retriever.store.retrieve(retriever.collection, ids, [], with_vector=True)}
    caption_image = np.asarray(data.caption_image)
    per_query = []
    chosen = query_subset(len(data.images), max_queries)
    for n, img in enumerate(chosen):
        vec = np.asarray(hits[ids[img]].vector, dtype=np.float32)
        sims = caption_vecs @ vec
        top = np.argsort(-sims, kind="stable")[:k_max]
        logits = retriever.score_captions(ids[img], [data.captions[c] for c in top])
        per_query.append((sims[top].astype(np.float64), logits.astype(np.float64), caption_image[top] == img))
        if progress:
            progress("image->text", n + 1, len(chosen))
    return per_query


def summarise(runs: Runs, ks: Sequence[int]) -> dict[str, Any]:
    """The JSON summary: recalls per direction (``t2i_r1`` ...) under first_stage, and per rerank_k under
    reranked (default score), logit_only and fused_tuned; delta_r1[k][direction] = {delta_r1, ci95} in points."""
    out: dict[str, Any] = {
        "first_stage": {}, "reranked": {}, "fusion_weight": runs.fusion_weight, "delta_r1": {},
        "logit_only": {}, "fused_tuned": {},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "resampled": "queries (t2i: captions)"},
        "seconds_per_query": round(runs.seconds_per_query, 4),
        "queries": {"t2i": len(runs.t2i), "i2t": len(runs.i2t)}, "images": runs.images,
    }
    for name, per_query in (("t2i", runs.t2i), ("i2t", runs.i2t)):
        first = first_stage_ranks(per_query)
        out["first_stage"].update(_prefixed(name, recalls(first)))
        for k in ks:
            ranks = query_ranks(per_query, k, runs.fusion_weight)
            out["reranked"].setdefault(str(k), {}).update(_prefixed(name, recalls(ranks)))
            out["logit_only"].setdefault(str(k), {}).update(_prefixed(name, recalls(query_ranks(per_query, k, 0.0))))
            out["delta_r1"].setdefault(str(k), {})[name] = _delta_r1(first, ranks)
            out["fused_tuned"].setdefault(str(k), {}).update(_fused_tuned(name, per_query, k))
    return out


def _prefixed(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """{'r1': x} -> {'t2i_r1': x}."""
    return {f"{name}_{key}": value for key, value in values.items()}


def _points(fraction: float) -> float:
    """A fraction as percentage points, 2 decimals (never -0.0)."""
    return round(fraction * 100.0, 2) + 0.0


def _delta_r1(first: np.ndarray, reranked: np.ndarray) -> dict[str, Any]:
    """R@1 of ``reranked`` minus R@1 of ``first`` (percentage points) and its paired bootstrap 95 % interval."""
    delta, (lo, hi) = paired_bootstrap_ci(first < 1, reranked < 1)
    return {"delta_r1": _points(delta), "ci95": [_points(lo), _points(hi)]}


def _fused_tuned(name: str, per_query: Sequence[PerQuery], k: int) -> dict[str, float]:
    """Weight tuned on the first half of the queries, recalls with it (and without) on the second half."""
    half = len(per_query) // 2
    tune, held = per_query[:half] or per_query, per_query[half:] or per_query
    w = tune_fusion_weight(tune, k)
    row = {f"{name}_weight": w}
    row.update(_prefixed(name, recalls(query_ranks(held, k, w))))
    row.update({f"{name}_{m}_unfused_same_half": v for m, v in recalls(query_ranks(held, k, 0.0)).items()})
    row.update({f"{name}_{m}_first_stage_same_half": v for m, v in recalls(first_stage_ranks(held)).items()})
    return row
