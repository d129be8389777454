"""Micro-batching of re-rank calls from concurrent searches (leader/follower, one forward per batch)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edje_qdrant.models.base import EdjeModel


class _Request:
    __slots__ = ("query", "tokens", "result", "error", "done")

    def __init__(self, query: str, tokens: np.ndarray) -> None:
        self.query, self.tokens = query, tokens
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False


class MicroBatcher:
    """Leader/follower micro-batching of rerank calls: the caller that finds no forward running leads; under the
    model lock it takes every queued request and scores them in one forward (one caption per candidate row).
    Callers that arrive meanwhile wait, and one of them leads the next forward. A lone call runs at once."""

    def __init__(self, model: "EdjeModel", model_lock: threading.Lock) -> None:
        self.model = model
        self.model_lock = model_lock
        self.cond = threading.Condition()
        self.pending: list[_Request] = []
        self.leading = False
        self.forwards = 0  # forwards run, and requests served (for tests / stats)
        self.requests = 0

    def rerank(self, query: str, tokens: np.ndarray) -> np.ndarray:
        req = _Request(query, tokens)
        with self.cond:
            self.pending.append(req)
            while self.leading and not req.done:
                self.cond.wait()
            if not req.done:
                self.leading = True
        if not req.done:
            try:
                with self.model_lock:
                    with self.cond:
                        batch, self.pending = self.pending, []
                    self._run(batch)
            finally:
                with self.cond:
                    self.leading = False
                    self.cond.notify_all()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _run(self, batch: list[_Request]) -> None:
        try:
            if len(batch) == 1:
                logits = self.model.rerank(batch[0].query, batch[0].tokens)
            else:
                captions = [r.query for r in batch for _ in range(len(r.tokens))]
                logits = self.model.rerank(captions, np.concatenate([r.tokens for r in batch]))
            start = 0
            for r in batch:
                r.result = logits[start:start + len(r.tokens)]
                start += len(r.tokens)
        except BaseException as exc:  # every waiting caller gets the error
            for r in batch:
                r.error = exc
        finally:
            self.forwards += 1
            self.requests += len(batch)
            for r in batch:
                r.done = True
