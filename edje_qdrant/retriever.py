"""Retriever: ANN on the `clip` vector, then EDJE re-ranking of the candidates' stored tokens."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .codec import decode_batch, decode_tokens
from .errors import InputError, ModelMismatchError, UnknownPointError
from .microbatch import MicroBatcher
from .schema import (METADATA_KEY, PAGE_CONTENT_KEY, RESULT_PAYLOAD_KEYS, SOURCE_KEY, TOKENS_KEY, canonical_id,
                     point_id)
from .search_args import check_counts, check_search_args
from .scores import fused_score
from .store import Store, open_store
from .store.base import CollectionSpec

if TYPE_CHECKING:  # torch and the models load only when a Retriever loads its model (after the store checks)
    from .models.base import EdjeModel

# What text search uses of a model; a preset may leave the rest (the vision tower) unloaded until first use.
SEARCH_PARTS = ("text", "reranker")

log = logging.getLogger(__name__)

@dataclass
class SearchResult:
    """One hit, best first. The three scores mean the same everywhere (CLI, JSON, HTML, HTTP, integrations):
    ``score`` is what the list is sorted by: ``rerank_score + model.fusion_weight * first_stage_score`` when
    re-ranked, else ``first_stage_score``; ``first_stage_score`` is the ANN cosine; ``rerank_score`` the joint
    encoder's logit (None when not re-ranked)."""

    id: str
    path: str | None
    score: float
    first_stage_score: float
    rerank_score: float | None
    page_content: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    first_stage_rank: int | None = None  # 1-based place in the first-stage (ANN) list; None when not known

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Retriever:
    """Text-to-image search over a collection built by ``ingest``.

    ``store`` is a Store, a ``qdrant_client.QdrantClient``, or a path to an embedded store. ``model`` is an
    EdjeModel or a preset name/path; by default the model recorded in the collection is loaded.
    """

    def __init__(
        self,
        store: Store | Any,
        collection: str = "images",
        model: "EdjeModel | str | None" = None,
        *,
        device: str | None = None,
        micro_batch: bool = False,
    ) -> None:
        """``micro_batch``: re-rank calls of concurrent searches that queue up while a forward runs go through the
        next forward together (more pairs per forward, higher throughput on a GPU); a lone search runs at once."""
        self.store = open_store(store, create=False)  # a path, client or Store; searching never creates a store
        self.collection = collection
        spec = self.store.get_spec(collection)
        if spec is None:
            raise self.store.missing_collection(collection)
        if model is None:
            model = spec.model
        if isinstance(model, str):
            from .models import load_model  # cost: torch, after the store and collection are checked

            self.model = load_model(model, device=device, parts=SEARCH_PARTS)
        else:
            self.model = model
        self._check_model(spec)
        self.store.open_collection(collection, spec, create=False)
        self.spec = spec
        self._model_lock = threading.Lock()
        self._batcher = MicroBatcher(self.model, self._model_lock) if micro_batch else None

    def _check_model(self, spec: CollectionSpec) -> None:
        if spec.fingerprint != self.model.fingerprint and spec.model == self.model.name:
            raise ModelMismatchError(
                f"collection '{self.collection}' was built with another version of model {spec.model} "
                f"({spec.fingerprint}, now {self.model.fingerprint}); re-ingest your images with the current "
                "model: `edje-qdrant ingest DIR` with a new --collection (or a fresh --store)"
            )
        if spec.fingerprint != self.model.fingerprint:
            raise ModelMismatchError(
                f"collection '{self.collection}' was built with model {spec.model} ({spec.fingerprint}), "
                f"not {self.model.name} ({self.model.fingerprint}); search it with --model {spec.model}"
            )

    def search(
        self,
        query: str,
        k: int = 10,
        rerank_k: int = 100,
        filter: Any = None,
        *,
        timings: dict[str, float] | None = None,
    ) -> list[SearchResult]:
        """Top ``k`` images for ``query``: ANN over ``rerank_k`` candidates, re-ranked by the joint encoder.

        ``filter``: a qdrant_client ``models.Filter`` or the small dict form (see ``store.filters``).
        ``timings``: if given, filled with seconds per stage (embed_query, ann_fetch, decode, rerank, and
        fetch_payload when the result payload is fetched for the top ``k`` only, total).
        """
        check_search_args(query, k, rerank_k)
        clock = _Clock(timings)
        with self._model_lock:
            vector = self.model.embed_query(query)
        clock.lap("embed_query")
        limit = rerank_k if rerank_k else k
        # Re-ranking more candidates than it returns: the ANN call brings only the token blobs, and the result
        # payload is read for the final top k alone (payload reads cost per point, metadata included).
        slim = rerank_k > k
        keys = ([TOKENS_KEY] if rerank_k else []) + ([] if slim else list(RESULT_PAYLOAD_KEYS))
        hits = self.store.query(self.collection, vector.tolist(), limit, keys, filter=filter)
        clock.lap("ann_fetch")
        results = _ranked(hits)
        if rerank_k and results:
            self._rerank(query, results, [h.payload.get(TOKENS_KEY) for h in hits], clock)
        results = results[:k]
        if slim and results:
            self._attach_payload(results)
            clock.lap("fetch_payload")
        clock.total()
        return results

    def search_image(self, image: str | os.PathLike[str] | bytes | Any, k: int = 10, filter: Any = None, *,
                     exclude_self: bool = True) -> list[SearchResult]:
        """"More like this": the ``k`` stored images nearest to ``image`` (a path, file bytes or a PIL image).

        First stage only: cosine on the global vector from the vision tower (the joint encoder scores text, so
        ``rerank_score`` is None). A photo given by path or bytes that is itself in the collection (same content,
        same point id) is left out of its own results unless ``exclude_self=False``; a PIL image has no bytes to
        identify it by, so nothing is left out. ``filter`` as in ``search``.
        """
        check_counts(k, 0)
        if getattr(self.model, "vision", None) is None:
            raise InputError(f"model {self.model.name} has no vision tower, which search_image needs; load the model "
                             "the collection was built with")
        picture, self_id = _query_image(image, self.model.vision)
        pixels = np.asarray(self.model.vision.preprocess(picture), dtype=np.float32)
        with self._model_lock:
            vectors, _ = self.model.embed_images(pixels[None])
        drop = self_id if exclude_self else None
        limit = k + 1 if drop else k
        hits = self.store.query(self.collection, vectors[0].tolist(), limit, list(RESULT_PAYLOAD_KEYS), filter=filter)
        return _ranked([h for h in hits if h.id != drop][:k])

    def search_similar(self, point_id: str, k: int = 10, filter: Any = None) -> list[SearchResult]:
        """"More like this" for a stored point: the ``k`` other points nearest to its global vector (first stage
        only, as ``search_image``; the point itself is left out). UnknownPointError when the id is not in the
        collection."""
        check_counts(k, 0)
        try:
            pid = canonical_id(point_id)
        except InputError:
            raise UnknownPointError(f"no point {point_id!r} in collection '{self.collection}': point ids are "
                                    "UUIDs") from None
        found = self.store.retrieve(self.collection, [pid], [], with_vector=True)
        if not found or found[0].vector is None:
            raise UnknownPointError(f"no point {pid} in collection '{self.collection}'")
        hits = self.store.query(self.collection, list(found[0].vector), k + 1, list(RESULT_PAYLOAD_KEYS),
                                filter=filter)
        return _ranked([h for h in hits if str(h.id) != pid][:k])

    def _attach_payload(self, results: list[SearchResult]) -> None:
        """Fill page_content / metadata / path of the final hits with one retrieve call."""
        found = {h.id: h.payload for h in self.store.retrieve(self.collection, [r.id for r in results],
                                                              list(RESULT_PAYLOAD_KEYS))}
        for r in results:
            if r.id in found:  # else deleted between the two calls: keep the hit, without its payload
                _set_payload(r, found[r.id])

    def rerank_ids(
        self, query: str, ids: Sequence[Any], first_stage_scores: Sequence[float | None] | None = None
    ) -> tuple[list[SearchResult], list[int]]:
        """Re-rank stored points named by id (e.g. hits of another retriever on this collection).

        Returns (results best first, positions in ``ids`` not found in the collection). A repeated id is
        re-ranked once; a point with a bad token blob keeps its input slot and is flagged, as in ``search``.
        """
        check_search_args(query, 1, 0)
        if first_stage_scores is not None and len(first_stage_scores) != len(ids):
            raise InputError(f"got {len(ids)} ids but {len(first_stage_scores)} first-stage scores")
        keys = [canonical_id(raw) for raw in ids]
        if not keys:
            return [], []
        hits = self.store.retrieve(self.collection, list(dict.fromkeys(keys)), [TOKENS_KEY, *RESULT_PAYLOAD_KEYS])
        by_id = {str(h.id): h for h in hits}
        results: list[SearchResult] = []
        blobs: list[Any] = []
        missing: list[int] = []
        seen: set[str] = set()
        for pos, key in enumerate(keys):
            hit = by_id.get(key)
            if hit is None:
                missing.append(pos)
                continue
            if key in seen:
                continue
            seen.add(key)
            first = first_stage_scores[pos] if first_stage_scores is not None else None
            first = float(first) if first is not None else 0.0
            results.append(_result(hit, first))
            blobs.append(hit.payload.get(TOKENS_KEY))
        if results:
            self._rerank(query, results, blobs, _Clock(None))
        return results, missing

    def score_captions(self, point_id: str, captions: Sequence[str]) -> np.ndarray:
        """Joint-encoder logits of several captions against one stored image (image -> text ranking)."""
        pid = canonical_id(point_id)
        hits = self.store.retrieve(self.collection, [pid], [TOKENS_KEY])
        if not hits:
            raise InputError(f"point {pid} is not in collection '{self.collection}'")
        tokens = decode_tokens(hits[0].payload.get(TOKENS_KEY), pid, (self.model.num_tokens, self.model.token_dim))
        batch = np.repeat(tokens[None], len(captions), axis=0)
        with self._model_lock:
            return self.model.rerank(list(captions), batch)

    def close(self) -> None:
        """Close the store (releases the embedded store's lock)."""
        self.store.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rerank(self, query: str, results: list[SearchResult], blobs: list[Any], clock: "_Clock") -> None:
        shape = (self.model.num_tokens, self.model.token_dim)
        tokens, bad = decode_batch(blobs, [r.id for r in results], shape)
        good = [i for i in range(len(results)) if i not in bad]
        clock.lap("decode")
        failures: dict[int, str] = {i: err.reason for i, err in bad.items()}
        if good:
            candidates = tokens[good] if bad else tokens
            if self._batcher is not None:
                logits = self._batcher.rerank(query, candidates)
            else:
                with self._model_lock:
                    logits = self.model.rerank(query, candidates)
            w = self.model.fusion_weight
            for i, logit in zip(good, logits.tolist()):
                if np.isfinite(logit):
                    results[i].rerank_score = float(logit)
                    results[i].score = fused_score(logit, results[i].first_stage_score, w)
                else:
                    failures[i] = "non-finite rerank score (corrupt token values)"
        clock.lap("rerank")
        for i, reason in failures.items():
            results[i].flags.append(f"rerank_failed: {reason}")
            log.warning("point %s kept its first-stage score: %s", results[i].id, reason)
        _order_in_place(results)


def _query_image(image: Any, vision: Any) -> tuple[Any, str | None]:
    """(RGB PIL image, point id of its bytes or None) for ``search_image``; decoded exactly as ingest does."""
    from PIL import Image  # cost: Pillow and the decoders load only for a search by image

    from .ingestion.decode import UnusableFile, decode_image, draft_size_for, read_file  # cost: as above
    from .ingestion.ids import sha256_bytes  # cost: as above (the ingestion package loads its decoders)

    if isinstance(image, Image.Image):
        return (image if image.mode == "RGB" else image.convert("RGB")), None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data, name = bytes(image), "the query image bytes"
    elif isinstance(image, (str, os.PathLike)):
        name = f"query image {os.fsdecode(image)}"
        try:
            data = read_file(image).data
        except UnusableFile as exc:
            reason = "no such file" if exc.kind == "vanished" else exc.reason
            raise InputError(f"{name}: {reason}; pass the path of a readable image file (JPEG, PNG, ...)") from None
    else:
        raise InputError(f"image must be a path, bytes or a PIL image, got {type(image).__name__}")
    try:
        decoded = decode_image(data, draft_size=draft_size_for(vision))
    except UnusableFile as exc:
        raise InputError(f"{name}: {exc.reason}; pass a JPEG, PNG, WebP, HEIC ... image") from None
    return decoded.image, point_id(sha256_bytes(data))


def _ranked(hits: Sequence[Any]) -> list[SearchResult]:
    """Results of a first-stage (ANN) list, in its order, each knowing its place in it."""
    results = [_result(h, float(h.score)) for h in hits]
    for rank, result in enumerate(results, 1):
        result.first_stage_rank = rank
    return results


def _result(hit: Any, first_stage_score: float) -> SearchResult:
    result = SearchResult(id=str(hit.id), path=None, score=first_stage_score, first_stage_score=first_stage_score,
                          rerank_score=None)
    _set_payload(result, hit.payload)
    return result


def _set_payload(result: SearchResult, payload: dict[str, Any]) -> None:
    """Fill path / page_content / metadata of a result from a point payload."""
    result.metadata = dict(payload.get(METADATA_KEY) or {})
    result.path = result.metadata.get(SOURCE_KEY)
    result.page_content = str(payload.get(PAGE_CONTENT_KEY, ""))


class _Clock:
    """Per-stage wall-clock laps into an optional dict."""

    def __init__(self, sink: dict[str, float] | None) -> None:
        self.sink = sink
        self.start = self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.sink is not None:
            now = time.perf_counter()
            self.sink[stage] = now - self.last
            self.last = now

    def total(self) -> None:
        if self.sink is not None:
            self.sink["total"] = time.perf_counter() - self.start


def _order_in_place(results: list[SearchResult]) -> None:
    """Re-ranked hits sorted by score (ties: first-stage order); failed ones keep their first-stage slot."""
    failed = {i for i, r in enumerate(results) if r.rerank_score is None}
    ranked = sorted(
        (i for i in range(len(results)) if i not in failed),
        key=lambda i: (-results[i].score, i),
    )
    order: list[int] = []
    it = iter(ranked)
    for slot in range(len(results)):
        order.append(slot if slot in failed else next(it))
    results[:] = [results[i] for i in order]
