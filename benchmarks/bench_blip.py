"""5. BLIP-style baseline: the same re-ranking, but each candidate image is re-encoded online by the vision tower
(+ adapter) before the joint encoder, as re-rankers without stored tokens must. Cost ratio = (tower + adapter +
joint encoder) / joint encoder alone, per query, same candidates, same run. The paper reports 53x against BLIP's
ViT-L; a ViT-L/14 shaped tower (random weights; its per-image cost measured on a few images) gives the comparable
row.

    python benchmarks/bench_blip.py [--quick]
"""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

import _common as C
from bench_ingest import ingest_model


def vit_l_tower() -> Any:
    """A random ViT-L/14 at 224 px (DINOv2-L shape: 1024 wide, 24 layers, 16 heads)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       patch_size=14, image_size=224, layer_norm_eps=1e-6)
    return Dinov2Model(cfg).eval()


def run(quick: bool = False) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    k = 10 if quick else 100
    model, what = ingest_model()
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((k, 3, 224, 224)).astype(np.float32)
    stored = C.realistic_tokens(k, model.num_tokens, model.token_dim, seed=2)
    q = C.QUERY
    bs = int(model.image_batch_size)

    def edje() -> None:
        model.rerank(q, stored)

    def blip_style() -> None:
        tokens = np.concatenate([model.embed_images(pixels[s:s + bs])[1] for s in range(0, k, bs)])
        model.rerank(q, tokens.astype(np.float16))

    model.embed_images(pixels[:2])  # warm-up of the tower
    t_edje = C.median_ms(C.measure(edje, reps=3, budget_s=30))
    t_blip = C.median_ms(C.measure(blip_style, warmup=0, reps=2, budget_s=20))
    rows = [["EDJE (stored tokens)", k, t_edje, 1.0], ["online re-encoding, " + what.split(";")[0], k, t_blip,
                                                        t_blip / t_edje]]
    # ViT-L/14: per-image forward cost on a few images, scaled to k candidates
    vit = vit_l_tower()
    few = torch.from_numpy(pixels[:2])
    per_img = C.median_ms(C.measure(lambda: vit(pixel_values=few), warmup=0, reps=2, budget_s=20)) / len(few)
    t_vitl = per_img * k + t_edje
    rows.append(["online re-encoding, ViT-L/14 shape (random; per image x k)", k, t_vitl, t_vitl / t_edje])
    C.table("BLIP-style baseline: re-encode every candidate image at query time (CPU, one query)",
            ["re-ranker", "candidates", "ms per query", "cost ratio"], rows,
            f"model: {what}; the online rows include the same joint-encoder pass; image decoding and resizing "
            f"are not counted (in favour of the baseline). ViT-L/14 per image: {per_img:.0f} ms.")
    return {"blip_style_cost_ratio": t_blip / t_edje, "blip_style_cost_ratio_vitl": t_vitl / t_edje,
            "blip_candidates": k}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(C.machine_line())
    run(args.quick)
