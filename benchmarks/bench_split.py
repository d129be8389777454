"""Split joint encoder vs the full-joint EDJE layout: query-time rerank cost and training throughput, measured
interleaved in one run (before = the previous default shape, MiniLM-L6 over [CLS] q [SEP] <image>x64 [SEP];
after = the default preset's split reranker).

    python benchmarks/bench_split.py [--quick]
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch

import _common as C


def _split_model(preset: Any) -> tuple[Any, str]:
    from edje_qdrant.models.split_joint import SplitJointReranker, SplitJointConfig
    from edje_qdrant.train.split_init import init_joint_from_minilm

    if preset is not None and isinstance(preset.reranker, SplitJointReranker):
        return preset.reranker, f"{C.OFFLINE_PRESET} (trained split reranker)"
    model = SplitJointReranker(SplitJointConfig(adapter="pool", patch_pool=4, num_tokens=16)).eval()
    init_joint_from_minilm(model)
    return model, "stand-in split reranker (pool adapter, m=16, 1 joint layer)"


def _train_step(loss_fn: Any, params: list[torch.nn.Parameter], bf16: bool) -> None:
    """Forward + backward of one batch of pairs (adapter, joint encoder, head)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn()
    loss.float().backward()
    for p in params:
        p.grad = None


def _old_loss(model: Any, texts: list[str], patches: torch.Tensor) -> Any:
    return model.score(texts, model.compress(patches)).logsumexp(0)


def _new_loss(model: Any, text: torch.Tensor, mask: torch.Tensor, cells: torch.Tensor) -> Any:
    return model.pair_logits(text, mask, model.adapter(cells)).logsumexp(0)


def run(quick: bool = False) -> dict[str, Any]:
    preset = C.offline_preset()
    old, old_what = C.joint_encoder(6, 64, None)
    new, new_what = _split_model(preset)
    m_new = new.num_tokens
    ks = (10, 100) if quick else (10, 100, 1000)
    rows, out = [], {"before": old_what, "after": new_what}
    for k in ks:
        t_old = torch.from_numpy(C.realistic_tokens(k, 64, seed=k)).float()
        t_new = torch.from_numpy(C.realistic_tokens(k, m_new, seed=k)).float()
        for precision in ("fp32", "bf16"):
            bf16 = precision == "bf16"

            def score(model: Any, tokens: torch.Tensor) -> Any:
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return model.score(C.QUERY, tokens)

            reps = 3 if k >= 1000 or quick else 9
            funcs = {"after": lambda: score(new, t_new)}
            if k <= 100 or not quick:
                funcs["before"] = lambda: score(old, t_old)
            times = C.measure_interleaved(funcs, reps=reps, budget_s=40.0)
            b = C.median_ms(times["before"]) if "before" in times else None
            a = C.median_ms(times["after"])
            rows.append([k, precision, b, a, None if b is None else b / a, C.p_ms(times["after"], 90)])
            out[f"rerank_ms_p50_k{k}_{precision}"] = {"before": b, "after": a}
    C.table("Joint encoder per query: before (full joint, m=64) vs after (split)",
            ["rerank_k", "precision", "before ms p50", "after ms p50", "speed-up", "after ms p90"], rows,
            f"before: {old_what}; after: {new_what}; query '{C.QUERY}'")
    # training throughput: the same number of (caption, image) pairs, forward + backward
    pairs = 32 if quick else 128
    texts = [C.QUERY] * pairs
    patches = torch.randn(pairs, 256, 384)  # DINOv2 patch tokens for the full-joint adapter
    from edje_qdrant.models.colour import WIDTH as COLOUR_WIDTH

    width = new.config.vision_width + (COLOUR_WIDTH if new.config.colour else 0)
    cells = torch.randn(pairs, m_new, width)  # pooled cells (+ colour features) for the split reranker's adapter
    with torch.inference_mode():
        text, mask = new.encode_text([C.QUERY])  # cached once per caption in training
    text, mask = text.clone().expand(pairs, -1, -1), mask.clone().expand(pairs, -1)
    old_params = [p for p in old.parameters() if p.requires_grad]
    new_params = [p for p in new.parameters() if p.requires_grad]
    train_rows = []
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        old.train(), new.train()
        times = C.measure_interleaved(
            {"before": lambda: _train_step(lambda: _old_loss(old, texts, patches), old_params, bf16),
             "after": lambda: _train_step(lambda: _new_loss(new, text, mask, cells), new_params, bf16)},
            reps=2 if quick else 4, budget_s=60.0)
        old.eval(), new.eval()
        b, a = pairs / (C.median_ms(times["before"]) / 1000), pairs / (C.median_ms(times["after"]) / 1000)
        train_rows.append([precision, pairs, b, a, a / b])
        out[f"train_pairs_per_s_{precision}"] = {"before": b, "after": a}
    C.table("Training throughput (joint encoder + head, forward + backward)",
            ["precision", "pairs/step", "before pairs/s", "after pairs/s", "speed-up"], train_rows,
            "both include their adapter; after excludes the frozen lower text layers, which training computes "
            "once per caption and caches")
    # what the Retriever runs: the default precision load_model picks on this machine
    from edje_qdrant.models.device import resolve_precision

    default = resolve_precision(None, torch.device("cpu"))
    out["default_precision"] = default
    out["cpu_rerank_ms_p50_k100"] = out[f"rerank_ms_p50_k100_{'bf16' if default == 'bf16' else 'fp32'}"]["after"]
    out["train_speedup"] = min(v["after"] / v["before"] for k, v in out.items() if k.startswith("train_pairs"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(C.machine_line())
    print(json.dumps(run(args.quick), indent=2, default=float))


if __name__ == "__main__":
    main()
