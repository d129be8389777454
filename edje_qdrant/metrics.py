"""Retrieval metrics shared by evaluation, training and benchmarks: recall@K from ranks (numpy only)."""
from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)


def recalls(ranks: np.ndarray, ks: tuple[int, ...] = RECALL_KS, prefix: str = "", suffix: str = ""
            ) -> dict[str, float]:
    """Recall@K in percent (2 decimals) from each query's 0-based rank of its first positive; keys
    ``{prefix}r{k}{suffix}``."""
    ranks = np.asarray(ranks)
    return {f"{prefix}r{k}{suffix}": round(float((ranks < k).mean() * 100.0), 2) for k in ks}
