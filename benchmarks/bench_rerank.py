"""1. Rerank throughput of the joint encoder: pairs/s per precision, m, caption length and batch (= rerank_k),
speed-up against fp32 and the logit deviation each path costs; plus each fast path on/off, and the GPU path
(cuda + bf16, pinned memory) when a GPU is present.

    python benchmarks/bench_rerank.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

import _common as C
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.models.full_joint import trim_padding

CPU_PRECISIONS = ("fp32", "bf16", "int8")


def _model(reranker: Any, precision: str, device: str = "cpu") -> EdjeModel:
    return EdjeModel(name="bench", vision=None, text=None, reranker=reranker, clip_dim=384, fingerprint="bench",
                     device=torch.device(device), precision=precision)


def caption(words: int) -> str:
    """A caption of about ``words`` wordpieces (12 -> the typical query, 61 -> the longest kept)."""
    return C.QUERY if words <= 12 else " ".join(C.LONG_WORDS.split()[:words])


def precision_grid(quick: bool, preset: Any) -> tuple[list[list[Any]], dict[str, Any]]:
    ms = (64,) if quick else (32, 64)
    texts = (12,) if quick else (12, 61)
    ks = (10, 30) if quick else (10, 100, 1000)
    cap_s = 6.0 if quick else 25.0  # a single forward estimated above this is skipped (noted in the table)
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    for m in ms:
        reranker, what = C.joint_encoder(6, m, preset)
        models = {p: _model(reranker, p) for p in CPU_PRECISIONS}
        acc_reranker, acc_what = C.accuracy_encoder(reranker, what, m)
        acc_models = models if acc_reranker is reranker else {p: _model(acc_reranker, p) for p in CPU_PRECISIONS}
        summary.setdefault("models", {})[m] = what
        summary.setdefault("accuracy_models", {})[m] = acc_what
        for words in texts:
            q = caption(words)
            n_text = reranker.tokenizer.encode(q).input_ids.shape[1] - m - 3
            rate: dict[str, float] = {}
            ref_logits: dict[int, np.ndarray] = {}
            for k in ks:
                tokens = C.realistic_tokens(k, m, seed=k)
                fns = {}
                for p in CPU_PRECISIONS:
                    if k >= 1000 and (m, words) != (64, 12):
                        continue  # the big batch only for the headline configuration (time budget)
                    est = k / rate[p] if p in rate else 0.0
                    if est > cap_s:
                        rows.append([m, n_text, k, p, None, None, None, None, f"skipped (est. {est:.0f} s)"])
                        continue
                    fns[p] = (lambda mod: lambda: mod.rerank(q, tokens))(models[p])
                if not fns:
                    continue
                # k=10 warms each model up; bigger batches: no extra warm-up round (time budget)
                times = C.measure_interleaved(fns, reps=3 if k <= 10 or quick else 2 if k <= 100 else 1,
                                              warmup=1 if k <= 10 else 0, budget_s=3 * cap_s)
                base_ms = C.median_ms(times["fp32"]) if "fp32" in times else None
                for p, ts in times.items():
                    t = C.median_ms(ts)
                    rate[p] = 1000.0 * k / t
                    judge = k <= 10 or ((m, words) == (64, 12) and k <= 100)  # deviations cost forwards too
                    logits = acc_models[p].rerank(q, tokens) if judge else None
                    if logits is None:
                        dev = agree = None
                    elif p == "fp32":
                        ref_logits[k] = logits
                        dev = agree = None
                    else:
                        ref = ref_logits.get(k)  # the fp32 row of this k comes first
                        dev = None if ref is None else float(np.abs(logits - ref).max())
                        agree = None if ref is None else C.rank_agreement(ref, logits)
                    rows.append([m, n_text, k, p, t, rate[p], (base_ms / t) if base_ms else None, dev,
                                 "" if agree is None else f"top1 {agree['top1']:.0f}, top10 "
                                 f"{agree['top10_overlap']:.1f}, rho {agree['spearman']:.3f}"])
                    if (m, words) == (64, 12) and k <= 100:  # headline: k=100 (the largest measured <= 100)
                        summary[f"ms_{p}"] = t
                        summary[f"dev_{p}"] = dev
                        summary[f"agree_{p}"] = agree
                        if p == "fp32" and logits is not None:
                            summary["spread_fp32"] = float(np.std(logits))
    return rows, summary


def compat_check() -> dict[str, Any] | None:
    """bf16 / int8 against fp32 on the official EDJE compatibility vectors (../shared/compat), when present."""
    d = Path(os.environ.get("EDJE_COMPAT_DIR") or Path(__file__).resolve().parents[2] / "shared" / "compat")
    if not (d / "weights.safetensors").is_file():
        return None
    from safetensors.torch import load_file

    from edje_qdrant.models.official import load_official_reranker

    cfg = json.loads((d / "config.json").read_text())
    cases = json.loads((d / "cases.json").read_text())
    model, _ = load_official_reranker(d / "weights.safetensors", cfg)
    tokens = load_file(str(d / "expected.safetensors"))["vision_projected_tokens"][[c["vision_index"] for c in cases]]
    caps = [c["caption"] for c in cases]
    out: dict[str, Any] = {}
    ref = _model(model, "fp32").rerank(caps, tokens)
    out["spread"] = float(np.std(ref))
    for p in ("bf16", "int8"):
        got = _model(model, p).rerank(caps, tokens)
        out[p] = {"max_abs_dev": float(np.abs(got - ref).max()), **C.rank_agreement(ref, got, top=5)}
    return out


def fast_paths(quick: bool, preset: Any) -> tuple[list[list[Any]], str]:
    """Each fast path on vs off at m=64, a 12-wordpiece query, fp32 (ratios from the same run, interleaved).
    Timings on the benchmark model; the logit deviation on the accuracy encoder (see ``C.accuracy_encoder``)."""
    k = 16 if quick else 32
    reps = 3
    r, what = C.joint_encoder(6, 64, preset)
    ra, what_acc = C.accuracy_encoder(r, what, 64)
    q, q2 = C.QUERY, "two children play football on a sandy beach near the sea"
    tokens = torch.from_numpy(C.realistic_tokens(2 * k, 64, seed=7)).float()
    one, two = tokens[:k], tokens[k:]
    enc = r.tokenizer.encode(q)
    caps = [caption(12 if i % 4 else 30) for i in range(k)]
    e = r.tokenizer.encode(caps)
    pad = r.tokenizer.max_length - e.input_ids.shape[1]
    padded = [torch.nn.functional.pad(t, (0, pad)) for t in (e.input_ids, e.token_type_ids, e.attention_mask)]

    def full(m: Any) -> Any:
        return m.forward(enc.input_ids, enc.token_type_ids, enc.attention_mask, one)

    def eager(m: Any) -> Any:
        m.bert.config._attn_implementation = "eager"
        try:
            return full(m)
        finally:
            m.bert.config._attn_implementation = "sdpa"

    def nograd(m: Any) -> Any:
        with torch.no_grad():
            return m.score(q, one)

    def separate(m: Any) -> Any:
        return torch.cat([m.score(q, one), m.score(q2, two)])

    cases = [  # name, off, on
        ("query broadcast (vs per-row captions)", lambda m: m.score([q] * k, one), lambda m: m.score(q, one)),
        ("[CLS]-only last layer (vs full)", full, lambda m: m.score(q, one)),
        ("trim padding (vs padded to 128)", lambda m: m.head_logits(m.encode(*padded, one)),
         lambda m: m.head_logits(m.encode(*trim_padding(*padded), one))),
        ("SDPA attention (vs eager)", eager, full),
        ("inference_mode (vs no_grad)", nograd, lambda m: m.score(q, one)),
        ("micro-batch 2 queries (vs 2 forwards)", separate, lambda m: m.score([q] * k + [q2] * k, tokens)),
    ]
    rows = []
    for name, off, on in cases:
        off_r = (lambda f=off: f(r)) if off is nograd else (lambda f=off: _im(f, r))
        ts, tf = C.measure_pair(off_r, lambda f=on: _im(f, r), reps=reps, budget_s=40)
        with torch.inference_mode():
            dev = None if off is nograd else float((off(ra) - on(ra)).abs().max())
        rows.append([name, C.median_ms(ts), C.median_ms(tf), C.median_ms(ts) / C.median_ms(tf), dev])
    return rows, f"timings: {what}; deviations: {what_acc}"


def _im(f: Any, m: Any) -> Any:
    with torch.inference_mode():
        return f(m)


def gpu_throughput(quick: bool) -> tuple[list[list[Any]], float | None]:
    """Paper configuration (MiniLM-L12, m=64, 61-wordpiece captions) on cuda: fp32 vs bf16, pinned + non-blocking."""
    if not torch.cuda.is_available():
        return [], None
    r, what = C.joint_encoder(12, 64)
    r = r.cuda()
    q = caption(61)
    rows, best = [], 0.0
    sync = torch.cuda.synchronize
    for k in ((100, 1000) if quick else (10, 100, 1000, 4096)):
        host = torch.from_numpy(C.realistic_tokens(k, 64, seed=k)).pin_memory()
        base = None
        for p in ("fp32", "bf16"):
            m = _model(r, p, "cuda")
            times = C.measure(lambda: m.rerank(q, host), warmup=3, reps=10, budget_s=20, sync=sync)
            t = C.median_ms(times)
            rate = 1000.0 * k / t
            base = base or t
            if p == "bf16":
                best = max(best, rate)
            rows.append([k, p, t, rate, base / t])
    return rows, best


def run(quick: bool = False) -> dict[str, Any]:
    preset = C.offline_preset()
    torch.set_grad_enabled(False)
    rows, summary = precision_grid(quick, preset)
    compat = compat_check()
    note = [f"model (timings): {summary['models']}", f"model (deviations): {summary['accuracy_models']}",
            "speed-up = fp32 time / this time, same run; dev = max |logit - fp32 "
            "logit| on the same pairs; agreement of the candidate order with fp32 (top-1 equal, top-10 overlap, "
            f"Spearman rho); fp32 logit std over candidates {summary.get('spread_fp32', 0):.3g}"]
    if compat:
        note.append("compat vectors (official EDJE weights, 8 cases): fp32 logit std %.3g; " % compat["spread"] +
                    "; ".join(f"{p}: max dev {v['max_abs_dev']:.3g}, top1 {v['top1']:.0f}, rho {v['spearman']:.3f}"
                              for p, v in compat.items() if p != "spread"))
    C.table("Rerank throughput (CPU, joint encoder MiniLM-L6 shape, EdjeModel.rerank incl. tokenize + upcast)",
            ["m", "text wp", "rerank_k", "precision", "ms (median)", "pairs/s", "speed-up", "max |dev|",
             "order vs fp32"], rows, "\n".join(note))
    l12 = []
    if not quick:
        r12, what12 = C.joint_encoder(12, 64)
        for p in ("fp32", "int8"):
            m = _model(r12, p)
            tok = C.realistic_tokens(100, 64, seed=3)
            t = C.median_ms(C.measure(lambda: m.rerank(C.QUERY, tok), reps=1, budget_s=20))
            l12.append([p, 100, t, 100000.0 / t])
        C.table("Paper configuration on CPU (MiniLM-L12 shape, m=64, 12 wordpieces)",
                ["precision", "rerank_k", "ms (median)", "pairs/s"], l12, f"model: {what12}")
    fp, fp_note = fast_paths(quick, preset)
    C.table("Fast paths (CPU fp32, m=64, 12-wordpiece query; ratio = off / on, same run)",
            ["fast path", "off ms", "on ms", "speed-up", "max |logit dev|"], fp, fp_note)
    gpu_rows, gpu_rate = gpu_throughput(quick)
    if gpu_rows:
        C.table("GPU joint encoder (MiniLM-L12 shape, m=64, 61 wordpieces, pinned host tokens)",
                ["rerank_k", "precision", "ms (median)", "pairs/s", "speed-up"], gpu_rows)
    else:
        print("\nGPU joint encoder: no CUDA device here (gpu_pairs_per_s = null)")
    best = min(("fp32", "int8"), key=lambda p: summary.get(f"ms_{p}", float("inf")))
    return {"rerank": summary, "compat": compat, "fast_paths": fp, "gpu_pairs_per_s": gpu_rate,
            "cpu_rerank_ms_p50_k100_by_precision": {p: summary.get(f"ms_{p}") for p in CPU_PRECISIONS},
            "model_used": summary["models"], "best_cpu_precision": best}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small grid for a smoke test")
    args = ap.parse_args()
    print(C.machine_line())
    run(args.quick)
