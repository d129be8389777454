"""2. Query latency breakdown on the embedded store (Qdrant Edge): a collection of synthetic points (random unit
vectors, realistic fp16 token blobs and metadata) made here, then ``Retriever.search`` per rerank_k with its stage
timings: query embedding, ANN, payload fetch, decode, rerank, total.

    python benchmarks/bench_search.py [--quick] [--points N]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from typing import Any

import numpy as np
import torch

import _common as C
from edje_qdrant.codec import codec_name, decode_batch, encode_tokens
from edje_qdrant.schema import RESULT_PAYLOAD_KEYS, TOKENS_KEY
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.retriever import Retriever
from edje_qdrant.store import EdgeStore
from edje_qdrant.store.base import CollectionSpec, PointRecord

DISTINCT_BLOBS = 97  # token sets cycled over the points (every point still stores its own copy)


def bench_model(precision: str = "fp32") -> tuple[EdjeModel, str]:
    """The offline preset when it loads, else MiniLM text tower + the L6 stand-in joint encoder."""
    preset = C.offline_preset(precision=precision)
    if preset is not None:
        return preset, f"{C.OFFLINE_PRESET} (trained), {precision}"
    text, what_t = C.text_tower()
    reranker, what_r = C.joint_encoder(6, 64)
    model = EdjeModel(name="bench-standin", vision=None, text=text, reranker=reranker, clip_dim=384,
                      fingerprint="bench-standin-0", precision=precision)
    return model, f"text: {what_t}; joint encoder: {what_r}; {precision}"


def metadata(i: int) -> dict[str, Any]:
    return {"source": f"photos/2024/{i // 500:03d}/IMG_{i:06d}.jpg", "folder": f"photos/2024/{i // 500:03d}",
            "width": 4032, "height": 3024, "mtime": 1717171717.0 + i, "size": 2_345_678 + i,
            "sha256": f"{i:064x}", "mime": "image/jpeg", "orientation": 1, "camera_make": "Canon",
            "camera_model": "EOS R6", "taken_at": "2024-06-01T12:00:00", "focal_length": 35.0, "iso": 200}


def build_collection(store: EdgeStore, name: str, n: int, model: EdjeModel, dtype: str = "fp16",
                     seed: int = 0) -> float:
    """Upsert ``n`` synthetic points; returns seconds spent (upserts + optimize)."""
    rng = np.random.default_rng(seed)
    spec = CollectionSpec(dim=model.clip_dim, model=model.name, fingerprint=model.fingerprint,
                          codec=codec_name(dtype, (model.num_tokens, model.token_dim)))
    store.open_collection(name, spec)
    blobs = [encode_tokens(t, dtype) for t in C.realistic_tokens(DISTINCT_BLOBS, model.num_tokens,
                                                                 model.token_dim, seed=seed).astype(np.float32)]
    t0 = time.perf_counter()
    for start in range(0, n, 500):
        vecs = rng.standard_normal((min(500, n - start), model.clip_dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        points = [PointRecord(id=str(uuid.UUID(int=start + j + 1)), vector=v.tolist(), payload={
            "page_content": f"IMG_{start + j:06d}.jpg", "metadata": metadata(start + j),
            TOKENS_KEY: blobs[(start + j) % DISTINCT_BLOBS], "edje_model": model.fingerprint})
            for j, v in enumerate(vecs)]
        store.upsert(name, points)
    store.optimize(name)
    return time.perf_counter() - t0


def concurrency(store: EdgeStore, model: EdjeModel, queries: list[str], rerank_k: int) -> list[list[Any]]:
    """Four threads search at once (Retriever with micro_batch off / on), plus one lone search each way."""
    import threading

    rows = []
    for flag in (False, True):
        r = Retriever(store, "bench", model, micro_batch=flag)
        r.search(queries[0], k=10, rerank_k=rerank_k)
        lone = C.median_ms(C.measure(lambda: r.search(queries[1], k=10, rerank_k=rerank_k), warmup=0, reps=2))
        walls = []
        for _ in range(2):
            threads = [threading.Thread(target=r.search, args=(q,), kwargs={"k": 10, "rerank_k": rerank_k})
                       for q in queries]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            walls.append(time.perf_counter() - t0)
        wall = C.median_ms(walls)
        forwards = f"{r._batcher.forwards} for {r._batcher.requests}" if flag else "1 per search"
        rows.append(["on" if flag else "off", rerank_k, wall, 1000.0 * len(queries) / wall, forwards, lone])
    return rows


def run(quick: bool = False, points: int | None = None, workdir: str | None = None) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    n = points or (1000 if quick else 10_000)
    ks = (10, 50) if quick else (10, 100, 1000)
    reps = {10: 5, 50: 3, 100: 5, 1000: 1} if not quick else {10: 3, 50: 2}
    model, what = bench_model()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = EdgeStore(tmp)
        build_s = build_collection(store, "bench", n, model)
        retriever = Retriever(store, "bench", model)
        rng = np.random.default_rng(5)
        rows, summary = [], {}
        queries = ["a dog runs on the beach", "two children play football in a park",
                   "a man rides a red bicycle down the street", "a woman in a blue dress holds an umbrella"]
        retriever.search(queries[0], k=10, rerank_k=10)  # warm-up
        for k in ks:
            stages: dict[str, list[float]] = {}
            for r in range(reps[k]):
                t: dict[str, float] = {}
                q = queries[r % len(queries)]
                retriever.search(q, k=10, rerank_k=k, timings=t)
                for s, v in t.items():
                    stages.setdefault(s, []).append(v)
            # the fetch variants measured standalone, interleaved, more runs (cheap; the stage timings above
            # come right after the query embedding and carry its cache/thread effects)
            vecs = [model.embed_query(q).tolist() for q in queries]
            step = iter(range(10**9))
            topk_ids = [h.id for h in store.query("bench", vecs[0], 10, [])]
            variants = {name: (lambda keys: lambda: store.query("bench", vecs[next(step) % len(vecs)], k, keys))(keys)
                        for name, keys in (("ann", []), ("ann_blobs", [TOKENS_KEY]),
                                           ("ann_all_payload", [TOKENS_KEY, *RESULT_PAYLOAD_KEYS]))}
            variants["retrieve_topk"] = lambda: store.retrieve("bench", topk_ids, list(RESULT_PAYLOAD_KEYS))
            stages.update(C.measure_interleaved(variants, reps=20 if k <= 100 else 5, warmup=1, budget_s=10))
            med = {s: C.median_ms(v) for s, v in stages.items()}
            blobs_fetch = max(0.0, med["ann_blobs"] - med["ann"])
            topk = med["retrieve_topk"] if k > 10 else 0.0
            one_call = max(0.0, med["ann_all_payload"] - med["ann"])
            rows.append([k, len(stages["total"]), med["embed_query"], med["ann"], blobs_fetch, med["decode"],
                         med["rerank"], topk, med["total"], C.p_ms(stages["total"], 90), one_call])
            summary[k] = {"embed_query": med["embed_query"], "ann": med["ann"], "fetch_blobs": blobs_fetch,
                          "decode": med["decode"], "rerank": med["rerank"], "fetch_topk_payload": topk,
                          "total": med["total"], "fetch_all_payload_one_call": one_call,
                          "fetch_decode": blobs_fetch + topk + med["decode"]}
        # decode alone, on the blobs of one k=100 candidate list (fp16 blobs -> float16 array)
        hits = store.query("bench", rng.standard_normal(model.clip_dim).tolist(), 100, [TOKENS_KEY])
        blobs = [h.payload[TOKENS_KEY] for h in hits]
        ids = [h.id for h in hits]
        dec = C.median_ms(C.measure(lambda: decode_batch(blobs, ids, (model.num_tokens, model.token_dim)),
                                    warmup=2, reps=30, budget_s=5))
        conc = concurrency(store, model, queries, 20 if quick else 50)
        store.close()
    C.table(f"Query latency breakdown (Edge store, {n:,} points, k=10, median ms)",
            ["rerank_k", "runs", "embed query", "ANN", "fetch blobs", "decode", "rerank", "top-k payload", "total",
             "total p90", "(one-call fetch)"], rows,
            f"model: {what}\nembed query, decode, rerank, total: Retriever.search stage timings; fetch columns: "
            f"standalone store calls, interleaved: fetch blobs = ANN call with the token blobs only (what the Retriever asks for) minus the same call without payload; top-k payload = page_content + metadata of the final 10 (one retrieve call); (one-call "
            f"fetch) = what fetching blobs + page_content + metadata of all rerank_k candidates in the ANN call "
            f"costs instead (the slim path off). decode_batch of 100 fp16 blobs alone: {dec:.2f} ms. Collection "
            f"built in {build_s:.1f} s.")
    C.table("Concurrent searches, micro_batch off vs on (4 threads, one search each, k=10)",
            ["micro_batch", "rerank_k", "wall ms (4 searches)", "searches/s", "forwards", "lone search ms"], conc)
    k100 = summary.get(100) or summary[max(summary)]
    return {"search": summary, "concurrency": conc, "points": n, "model_used": what, "decode_ms_100": dec,
            "fetch_decode_ms_k100": k100["fetch_decode"],
            "search_ms_p50_k100": k100["total"], "rerank_stage_ms_p50_k100": k100["rerank"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1,000 points and small rerank_k")
    ap.add_argument("--points", type=int, default=None)
    args = ap.parse_args()
    print(C.machine_line())
    run(args.quick, args.points)
