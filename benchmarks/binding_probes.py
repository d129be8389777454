"""Where the binding ceiling is: linear probes on the features the reranker gets, fused with the first stage.

    python benchmarks/binding_probes.py [--data ../shared/data/flickr8k] [--json out.json]

Pairs are the training counterfeits the reranker trains on (train/binding_lists.py: per fold, balanced against the
other fold's prior). Each pair is scored by the cross-fitted first stage that never saw its image (scale x cosine
difference of true caption and counterfeit), and a probe adds a learned term on per-image features:

- colour_replaced: a linear read-out per colour word of the image's colour histograms (models/colour.py: max and
  mean over the 256 patches, or over 4x4 pooled cells), optionally with the colour of the DINOv2-salient region;
- person_swapped: a linear gender read-out of the DINOv2 global feature (CLS + mean patch).

Probes are fitted on fold-0 images and reported on fold-1 images (accuracy, percent). Needs the token cache and
cross-fitted first stages that ``benchmarks/reranker_ablation.py`` builds (run one ablation first); exits 0 with a
message when the Flickr8k data is absent.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "flickr8k"


def fit_probe(first: torch.Tensor, feats: torch.Tensor, sign_true: torch.Tensor, sign_fake: torch.Tensor,
              train: torch.Tensor, steps: int = 400, weight_decay: float = 1e-3) -> torch.Tensor:
    """Scores ``a x first + <W[true] - W[fake], x> + b[true] - b[fake]`` (W: one row per class) fitted with a
    logistic loss on the ``train`` rows; returns the score of every row (> 0: the true caption wins)."""
    x = (feats - feats[train].mean(0)) / (feats[train].std(0) + 1e-6)
    n_cls = int(max(sign_true.max(), sign_fake.max())) + 1
    w = torch.zeros(n_cls, x.shape[1], requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    a = torch.ones((), requires_grad=True)
    opt = torch.optim.Adam([w, b, a], lr=1e-2, weight_decay=weight_decay)

    def score(rows: torch.Tensor) -> torch.Tensor:
        t, f = sign_true[rows], sign_fake[rows]
        return a * first[rows] + ((w[t] - w[f]) * x[rows]).sum(1) + b[t] - b[f]

    for _ in range(steps):
        loss = F.softplus(-score(train)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return score(torch.arange(len(first)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ablations", help="the ablation harness's folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.data / "captions.tsv").is_file():
        print(f"no Flickr8k data at {args.data}; nothing to do")
        return 0
    from edje_qdrant.train.binding_lists import training_counterfeits
    from edje_qdrant.train.common import default_cache_folder
    from edje_qdrant.train.counterfeit import COLOURS, gender, tokens
    from edje_qdrant.train.crossfit import fold_of_images, heldout_text_embeddings
    from edje_qdrant.train.data import caption_set, read_captions
    from edje_qdrant.train.token_cache import TokenCache, colour_cache, view_folder
    from safetensors.torch import load_file

    torch.manual_seed(0)
    images = args.data / "images"
    train = caption_set(read_captions(args.data / "captions.tsv"), "train")
    cf_dir = args.out / "crossfit"
    token_root = default_cache_folder(images).with_name(default_cache_folder(images).name + "-views")
    if not (cf_dir / "heldout.safetensors").is_file() or not view_folder(token_root, "orig", 12).is_dir():
        print(f"no cross-fitted first stages in {cf_dir} or token cache in {token_root}: run "
              "benchmarks/reranker_ablation.py once first")
        return 1
    fold_of = fold_of_images(train.images, 2, json.loads((cf_dir / "folds.json").read_text())["seed"])
    fold = torch.tensor([fold_of[n] for n in train.images])
    held = load_file(str(cf_dir / "heldout.safetensors"))
    fakes = training_counterfeits(train, fold, 0)
    fake_fold = fold[torch.tensor([train.caption_image[c] for c in fakes.source])]
    fake_emb = heldout_text_embeddings(cf_dir, fakes.texts, fake_fold, torch.device("cpu"), True)
    cache = TokenCache(view_folder(token_root, "orig", 12))
    colour = np.asarray(colour_cache(images, cache.images, token_root, "orig"), dtype=np.float32)

    def first_delta(j: int) -> float:
        c = fakes.source[j]
        img = train.caption_image[c]
        return float(held["scale"][fold[img]] * (held["caption_emb"][c] - fake_emb[j]) @ held["image_emb"][img])

    report: dict = {}
    cid = {c: i for i, c in enumerate(COLOURS)}
    rows = []  # colour_replaced: (image, true colour, fake colour, first-stage delta)
    for j, kind in enumerate(fakes.kinds):
        if kind != "colour_replaced":
            continue
        t = [w.low for w in tokens(train.captions[fakes.source[j]])]
        f = [w.low for w in tokens(fakes.texts[j])]
        changed = [(a, b) for a, b in zip(t, f) if a != b]
        if len(changed) == 1 and changed[0][0] in cid and changed[0][1] in cid:
            rows.append((train.caption_image[fakes.source[j]], cid[changed[0][0]], cid[changed[0][1]], first_delta(j)))
    img = [r[0] for r in rows]
    index = {n: i for i, n in enumerate(cache.images)}
    hist = torch.from_numpy(colour[[index[train.images[i]] for i in img]][:, :, :11])  # [P, 256, 11]
    cells = F.avg_pool2d(hist.view(-1, 16, 16, 11).permute(0, 3, 1, 2), 4).flatten(2).transpose(1, 2)
    first = torch.tensor([r[3] for r in rows])
    t_cls, f_cls = torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])
    is_train = fold[torch.tensor(img)] == 0
    test = ~is_train
    feats = {"patch colour (max, mean)": torch.cat([hist.amax(1), hist.mean(1)], 1),
             "4x4-cell colour (max, mean)": torch.cat([cells.amax(1), cells.mean(1)], 1)}
    out = {"pairs_fit": int(is_train.sum()), "pairs_test": int(test.sum()),
           "first_stage": round(100 * float((first[test] > 0).float().mean()), 1)}
    for name, x in feats.items():
        s = fit_probe(first, x, t_cls, f_cls, is_train.nonzero().flatten())
        out[f"first_stage + {name}"] = round(100 * float((s[test] > 0).float().mean()), 1)
    report["colour_replaced"] = out

    prow = []  # person_swapped: (image, 1 male / 0 female true, first-stage delta)
    for j, kind in enumerate(fakes.kinds):
        g = gender(train.captions[fakes.source[j]]) if kind == "person_swapped" else None
        if g:
            prow.append((train.caption_image[fakes.source[j]], int(g == "male"), first_delta(j)))
    pimg = torch.tensor([r[0] for r in prow])
    feats_p = cache.global_features([train.images[i] for i in pimg.tolist()])
    first = torch.tensor([r[2] for r in prow])
    t_cls = torch.tensor([r[1] for r in prow])
    is_train = fold[pimg] == 0
    test = ~is_train
    out = {"pairs_fit": int(is_train.sum()), "pairs_test": int(test.sum()),
           "first_stage": round(100 * float((first[test] > 0).float().mean()), 1)}
    for wd in (1e-3, 1e-1):
        s = fit_probe(first, feats_p, t_cls, 1 - t_cls, is_train.nonzero().flatten(), weight_decay=wd)
        out[f"first_stage + DINOv2 global gender (weight decay {wd:g})"] = round(
            100 * float((s[test] > 0).float().mean()), 1)
    report["person_swapped"] = out
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
