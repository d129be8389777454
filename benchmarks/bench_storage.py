"""4. Storage: bytes per blob and per point on disk (Qdrant Edge), fp16 vs int8 token blobs, and what int8
storage costs the re-ranking (logit deviation and candidate order against fp16 on the same candidates).

    python benchmarks/bench_storage.py [--quick] [--points N]
"""
from __future__ import annotations

import argparse
import tempfile
from typing import Any

import msgpack
import numpy as np
import pybase64
import torch

import _common as C
from bench_search import bench_model, build_collection
from edje_qdrant.codec import decode_batch, encode_tokens
from edje_qdrant.store import EdgeStore


def blob_sizes(dtype: str, m: int = 64, d: int = 384) -> dict[str, int]:
    blob = encode_tokens(C.realistic_tokens(1, m, d)[0].astype(np.float32), dtype)
    raw = pybase64.b64decode(blob)
    record = msgpack.unpackb(raw)
    token_bytes = len(record["data"]) + len(record.get("scales", b""))
    return {"token_bytes": token_bytes, "msgpack_bytes": len(raw), "base64_chars": len(blob)}


def disk_per_point(n: int, dtype: str, model: Any, workdir: str | None) -> tuple[float, float]:
    """(bytes/point over the whole collection, marginal bytes/point between n/2 and n points)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = EdgeStore(tmp)
        half = n // 2
        build_collection(store, "half", half, model, dtype)
        build_collection(store, "full", n, model, dtype)
        a, b = store.disk_usage("half"), store.disk_usage("full")
        store.close()
    return b / n, (b - a) / (n - half)


def int8_cost(model: Any, k: int, queries: list[str]) -> dict[str, float]:
    """Rerank k candidates from fp16 vs int8 blobs of the same tokens: logit deviation and order agreement."""
    m, d = model.num_tokens, model.token_dim
    encoder, what = C.accuracy_encoder(model.reranker, model.name, m)
    if encoder is not model.reranker:
        from edje_qdrant.models.base import EdjeModel

        model = EdjeModel(name="stand-in", vision=None, text=None, reranker=encoder, clip_dim=model.clip_dim,
                          fingerprint="stand-in", precision=model.precision)
    tokens = C.realistic_tokens(k, m, d, seed=11).astype(np.float32)
    out: dict[str, list[float]] = {}
    for dtype in ("fp16", "int8"):
        blobs = [encode_tokens(t, dtype) for t in tokens]
        arr, bad = decode_batch(blobs, list(range(k)), (m, d))
        assert not bad
        out[dtype] = arr
    devs, agree = [], []
    for q in queries:
        a, b = model.rerank(q, out["fp16"]), model.rerank(q, out["int8"])
        devs.append(float(np.abs(a - b).max()))
        agree.append(C.rank_agreement(a, b))
    return {"model": what, "max_abs_dev": max(devs), "top1": float(np.mean([x["top1"] for x in agree])),
            "top10_overlap": float(np.mean([x["top10_overlap"] for x in agree])),
            "spearman": float(np.mean([x["spearman"] for x in agree])),
            "token_rel_err": float(np.abs(out["int8"].astype(np.float32) - out["fp16"].astype(np.float32)).max()
                                   / np.abs(tokens).max())}


def run(quick: bool = False, points: int | None = None, workdir: str | None = None) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    n = points or (400 if quick else 2000)
    model, what = bench_model()
    rows, res = [], {}
    for dtype in ("fp16", "int8"):
        sizes = blob_sizes(dtype, model.num_tokens, model.token_dim)
        per_point, marginal = disk_per_point(n, dtype, model, workdir)
        rows.append([dtype, sizes["token_bytes"], sizes["msgpack_bytes"], sizes["base64_chars"], per_point,
                     marginal])
        res[dtype] = {**sizes, "disk_bytes_per_point": per_point, "disk_marginal_bytes_per_point": marginal}
    k = 20 if quick else 100
    cost = int8_cost(model, k, [C.QUERY] if quick else [C.QUERY, "two children play football in a park",
                                                        "a woman in a blue dress holds an umbrella"])
    C.table(f"Storage per point (Qdrant Edge, {n:,} points with metadata)",
            ["blob", "token bytes", "msgpack bytes", "base64 chars (stored)", "disk B/point", "disk B/point marginal"],
            rows, f"marginal = growth from {n // 2:,} to {n:,} points. int8 vs fp16 re-ranking of the same {k} "
            f"candidates ({cost['model']}): max |logit dev| {cost['max_abs_dev']:.3g}, top-1 agreement {cost['top1']:.2f}, "
            f"top-10 overlap {cost['top10_overlap']:.2f}, Spearman {cost['spearman']:.3f}; max token error "
            f"{cost['token_rel_err']:.3g} of max |x|. R@1 on the Flickr8k dev split: not measured here (needs the "
            f"preset's trained re-ranker and the eval run).")
    return {"storage": res, "int8_rerank_cost": cost, "blob_bytes_fp16": res["fp16"]["msgpack_bytes"],
            "blob_bytes_int8": res["int8"]["msgpack_bytes"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--points", type=int, default=None)
    args = ap.parse_args()
    print(C.machine_line())
    run(args.quick, args.points)
