"""The paper's configuration (issue 4): EDJE re-ranking with stored tokens vs re-encoding every candidate with the
SigLIP2 ViT-L/16 @ 384 vision tower online (the BLIP-style path). Random weights of the real shapes: the vision
tower is transformers' SiglipVisionModel at ViT-L/16@384 (1024 wide, 24 layers, 16 heads, 576 patch tokens), the
adapter compresses 576x1024 to 64x384, the joint encoder is MiniLM-L12-H384 shaped. Both paths are timed in the
same run; the tower's per-image cost is measured on a few images and scaled to the candidate count.

    python benchmarks/bench_siglip2.py [--quick]
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

import _common as C


def paper_reranker() -> Any:
    from edje_qdrant.models.full_joint import FullJointReranker, FullJointConfig

    torch.manual_seed(0)
    cfg = FullJointConfig(vision_width=1024, vision_heads=16, num_tokens=64, adapter_hidden=8192, hidden_size=384,
                          num_layers=12, num_heads=12, intermediate_size=1536)
    return FullJointReranker(cfg).eval()


def siglip2_l16_384() -> Any:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             image_size=384, patch_size=16, layer_norm_eps=1e-6)
    return SiglipVisionModel(cfg).eval()


def run(quick: bool = False) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    k = 10 if quick else 100
    reranker = paper_reranker()
    stored = torch.from_numpy(C.realistic_tokens(k, 64, 384, seed=3)).float()
    tower = siglip2_l16_384()
    few = torch.randn(1 if quick else 2, 3, 384, 384)

    def edje() -> None:
        with torch.inference_mode():
            reranker.score(C.QUERY, stored)

    def encode_few() -> None:
        with torch.inference_mode():
            patches = tower(pixel_values=few).last_hidden_state  # [n, 576, 1024]
            reranker.compress(patches)

    t_edje = C.median_ms(C.measure(edje, reps=3, budget_s=30))
    per_img = C.median_ms(C.measure(encode_few, warmup=0, reps=2, budget_s=60)) / len(few)
    t_blip = per_img * k + t_edje
    pairs_per_s = k / (t_edje / 1000.0)
    C.table("Paper configuration (SigLIP2-L/16@384 tower, MiniLM-L12 joint encoder, m=64), fp32, random weights",
            ["re-ranker", "candidates", "ms per query", "cost ratio"],
            [["EDJE (stored 64x384 tokens)", k, t_edje, 1.0],
             ["online re-encoding with SigLIP2-L/16@384 + adapter", k, t_blip, t_blip / t_edje]],
            f"EDJE rerank: {pairs_per_s:.0f} pairs/s; SigLIP2-L/16@384 + adapter per image: {per_img:.0f} ms "
            f"(measured on {len(few)} image(s), scaled to {k} candidates).")
    return {"siglip2_rerank_pairs_per_s": pairs_per_s, "siglip2_online_ms_per_image": per_img,
            "siglip2_cost_ratio": t_blip / t_edje}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(C.machine_line())
    run(quick=args.quick)
