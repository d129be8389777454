"""Ablation harness of the split reranker: train one recipe, score it on the dev split, append a JSON line.

    python benchmarks/reranker_ablation.py --name base [--set token_dropout=0] [--k 20] [--out runs/ablations]

Steps (each memoised in --out, so a run resumes and later runs reuse them): DINOv2 token caches of both views
and the requested layers; cross-fitted first stages (same recipe as the shipped first stage); the reranker
trained with the given options; dev recall at rerank_k=K with the shipped first stage as candidates, every dev
caption and image, and a paired bootstrap 95 % interval for each R@1 difference. Training and dev tokens come
from the cache (bf16 DINOv2); the product-path numbers of a preset come from ``edje-qdrant eval``.
Needs ../shared/data/flickr8k (exits 0 with a message when absent).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "flickr8k"


def parse_sets(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> options (values parsed as JSON when they parse, else kept as strings)."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(f"--set {p!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def dev_embeddings(model, dev, token_root):
    """Shipped first stage on dev from the token cache: caption vectors [C, d], image vectors [I, d]."""
    from edje_qdrant.models import dinov2
    from edje_qdrant.train.token_cache import TokenCache, view_folder

    token_cache = TokenCache(view_folder(token_root, "orig", 12))
    with torch.inference_mode():
        feats = torch.cat([dinov2.global_feature(token_cache.rows(dev.images[i:i + 256]).float())
                           for i in range(0, len(dev.images), 256)])
        img = model.vision.head(feats).float()
        txt = torch.cat([model.text.encode(dev.captions[i:i + 256]) for i in range(0, len(dev.captions), 256)])
    return txt.float(), img


def dev_binding(model, shipped, dev, train_captions, img, comp, weight, device):
    """Binding accuracy on dev pairs (``binding.binding_table``): first stage = the shipped model's cosine,
    re-ranked = joint logit on the cached dev tokens + ``weight`` x cosine."""
    from edje_qdrant.binding import binding_table
    from edje_qdrant.train.counterfeit import binding_pairs

    pairs = binding_pairs(dev.captions, train_captions)
    texts = sorted({p.true for p in pairs} | {p.fake for p in pairs})
    row = {t: i for i, t in enumerate(texts)}
    with torch.inference_mode():
        vec = torch.cat([shipped.text.encode(texts[i:i + 256]) for i in range(0, len(texts), 256)]).float()
    cols = torch.tensor([dev.caption_image[p.caption] for p in pairs])
    scored = {}
    for side in ("true", "fake"):
        t = [getattr(p, side) for p in pairs]
        scored[f"first_{side}"] = (vec[[row[x] for x in t]] * img[cols]).sum(-1).double().numpy()
        with torch.inference_mode():
            logits = [model.score(t[i:i + 256], comp[cols[i:i + 256]].to(device)).float().cpu()
                      for i in range(0, len(t), 256)]
        scored[f"logit_{side}"] = torch.cat(logits).double().numpy()
    return binding_table(pairs, scored, weight)


def attribute_recall(dev, ranks):
    """Dev T2I R@1 (first stage vs re-ranked) of the captions naming a colour or a person, paired 95 % CI."""
    from edje_qdrant.evaluate import paired_bootstrap_ci
    from edje_qdrant.train.counterfeit import attributes

    mask = torch.tensor([bool(attributes(c)) for c in dev.captions]).numpy()
    first, reranked = ranks["t2i_first"][mask] < 1, ranks["t2i"][mask] < 1
    mean, (lo, hi) = paired_bootstrap_ci(first, reranked)
    return {"queries": int(mask.sum()), "first_r1": round(100 * first.mean(), 2),
            "reranked_r1": round(100 * reranked.mean(), 2),
            "delta": {"mean": round(100 * mean, 2), "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--k", type=int, default=20, help="rerank_k on dev")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ablations")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--token-root", type=Path, default=None)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true", help="score an already trained run")
    ap.add_argument("--candidates", choices=("crossfit", "production"), default="crossfit",
                    help="training candidates and residual scores: cross-fitted first stages (default) or the "
                         "shipped first stage itself, which saw the training images")
    ap.add_argument("--export", type=Path, default=None, help="also write a preset folder from this run here")
    args = ap.parse_args(argv)
    if not (args.data / "captions.tsv").is_file():
        print(f"no Flickr8k data at {args.data}; nothing to do")
        return 0
    import logging

    from edje_qdrant.models import load_model
    from edje_qdrant.models.flickr8k_preset import NAME, PRESET_DIR
    from edje_qdrant.models.split_joint import SplitJointReranker, SplitJointConfig
    from edje_qdrant.train.common import default_cache_folder, pick_device, use_bf16
    from edje_qdrant.train.data import caption_set, read_captions
    from edje_qdrant.train.split_run import train_split
    from edje_qdrant.evaluate import paired_bootstrap_ci
    from edje_qdrant.train.rerank_eval import rerank_recall
    from edje_qdrant.train.split_reranker import CONFIG, WEIGHTS, load_patch_tokens

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    options = parse_sets(args.sets)
    device = pick_device(None)
    bf16 = use_bf16(device)
    captions, images = args.data / "captions.tsv", args.data / "images"
    rows = read_captions(captions)
    dev = caption_set(rows, "dev")
    token_root = args.token_root or default_cache_folder(images).with_name(default_cache_folder(images).name + "-views")
    run = args.out / args.name
    t0 = time.time()
    if args.eval_only:
        cfg = json.loads((run / CONFIG).read_text())
    else:
        cfg = train_split(captions, images, args.out, options, token_root=token_root, folds=args.folds,
                          candidates=args.candidates, run_name=args.name, progress=False)
    from safetensors.torch import load_file

    model = SplitJointReranker(SplitJointConfig.from_dict(cfg["reranker"])).to(device)
    model.load_state_dict(load_file(str(run / WEIGHTS)), strict=False)
    model.eval()
    shipped = load_model(NAME, device=str(device), precision="fp32")
    txt, img = dev_embeddings(shipped, dev, token_root)
    weight = shipped.fusion_weight * float(cfg.get("fusion_gain", 1.0))  # the exported preset's fusion weight
    sim, pos = weight * (txt @ img.t()), torch.tensor(dev.caption_image)
    rc = SplitJointConfig.from_dict(cfg["reranker"])
    dev_tokens = load_patch_tokens(token_root, dev.images, "orig", cfg["options"]["layers"], rc.patch_pool,
                                   colour_from=images if rc.colour else None)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        comp = model.adapter(dev_tokens.float()).float()
        res = rerank_recall(model, dev.captions, sim, pos, comp, k=args.k)
    line = {"name": args.name, "options": cfg["options"], "k": args.k, "fusion_weight": round(weight, 3),
            "dev": res["summary"],
            "train_seconds": cfg.get("train_seconds"), "pairs_per_second": cfg.get("pairs_per_second"),
            "steps": cfg.get("steps"), "val_curve": cfg.get("val_curve"), "wall_seconds": round(time.time() - t0)}
    for d in ("t2i", "i2t"):
        mean, (lo, hi) = paired_bootstrap_ci(res["ranks"][f"{d}_first"] < 1, res["ranks"][d] < 1)
        mean, lo, hi = 100 * mean, 100 * lo, 100 * hi
        line[f"{d}_delta_r1"] = {"mean": round(mean, 2), "ci95": [round(lo, 2), round(hi, 2)]}
    line["attribute_queries"] = attribute_recall(dev, res["ranks"])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        line["binding"] = dev_binding(model, shipped, dev, caption_set(rows, "train").captions, img, comp, weight,
                                      device)
    if args.export:
        from edje_qdrant.train.export import export_model

        export_model("split", run, args.export, PRESET_DIR, metrics={"harness_dev": line})
    print(json.dumps(line))
    with (args.out / "ablations.jsonl").open("a") as fh:
        fh.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
