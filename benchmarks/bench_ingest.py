"""3. Ingest pipeline efficiency: images/s of the whole ``ingest`` (walk, hash, decode workers, batching, model,
encode, Edge upsert) against the model forward alone (vision tower + adapter, the same batches, pixels already in
memory) on the same images. Efficiency = forward-only time / ingest time.

    python benchmarks/bench_ingest.py [--quick] [--images N] [--upscale PX]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import _common as C
from edje_qdrant.ingestion import ingest
from edje_qdrant.ingestion.steps import default_workers
from edje_qdrant.models.base import EdjeModel
from edje_qdrant.store import EdgeStore

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"


def ingest_model(precision: str = "fp32") -> tuple[EdjeModel, str]:
    preset = C.offline_preset(precision=precision)
    if preset is not None:
        return preset, f"{C.OFFLINE_PRESET} (trained), {precision}"
    vision = C.vision_tower()
    reranker, what_r = C.joint_encoder(6, 64)
    model = EdjeModel(name="bench-ingest", vision=vision.tower, text=None, reranker=reranker, clip_dim=384,
                      fingerprint="bench-ingest-0", precision=precision)
    return model, f"vision: {vision.what}; adapter: {what_r}; {precision}"


def make_images(folder: Path, n: int, upscale: int | None) -> str:
    """Real Flickr8k JPEGs when present (optionally re-saved larger), else synthetic photos-like JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(FLICKR.glob("*.jpg"))[:n] if FLICKR.is_dir() else []
    if len(files) >= n:
        for f in files:
            if upscale:
                img = Image.open(f).convert("RGB")
                img.resize((upscale, upscale * 3 // 4), Image.Resampling.BICUBIC).save(folder / f.name, quality=90)
            else:
                shutil.copyfile(f, folder / f.name)
        return f"{n} Flickr8k JPEGs" + (f" re-saved at {upscale}x{upscale * 3 // 4}" if upscale else
                                        f" ({Image.open(files[0]).size[0]} px)")
    rng = np.random.default_rng(0)
    size = upscale or 640
    for i in range(n):
        base = rng.integers(0, 255, (size * 3 // 4 // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size * 3 // 4), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg")
    return f"{n} synthetic JPEGs {size}x{size * 3 // 4}"


def run(quick: bool = False, images: int | None = None, upscale: int | None = None,
        workdir: str | None = None) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    n = images or (32 if quick else 128)
    model, what = ingest_model()
    bs = int(model.image_batch_size)
    workers = default_workers()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp) / "images"
        desc = make_images(folder, n, upscale)
        paths = sorted(folder.iterdir())
        # warm-up: one batch through the model
        pixels = np.stack([model.vision.preprocess(Image.open(p).convert("RGB")) for p in paths[:bs]])
        model.embed_images(pixels[: min(4, len(pixels))])
        # model forward alone, same batches, pixels decoded beforehand
        all_pixels = [model.vision.preprocess(Image.open(p).convert("RGB")) for p in paths]
        t0 = time.perf_counter()
        for start in range(0, n, bs):
            model.embed_images(np.stack(all_pixels[start:start + bs]))
        forward_s = time.perf_counter() - t0
        # the whole ingest path
        store = EdgeStore(Path(tmp) / "store")
        t0 = time.perf_counter()
        report = ingest(folder, store, model, "bench", workers=workers, batch_size=bs)
        ingest_s = time.perf_counter() - t0
        store.close()
    if report.ingested != n:
        raise RuntimeError(f"ingest stored {report.ingested} of {n} images: {report.failures[:3]}")
    eff = forward_s / ingest_s
    rows = [["model forward alone (tower + adapter)", n, forward_s, n / forward_s, None],
            ["ingest (walk, hash, decode x%d, model, encode, upsert)" % workers, n, ingest_s, n / ingest_s, eff]]
    C.table("Ingest pipeline efficiency (same images, same batches)",
            ["path", "images", "seconds", "images/s", "efficiency"], rows,
            f"model: {what}; images: {desc}; batch {bs}, {workers} decode workers, {os.cpu_count()} CPUs "
            "(decode workers and the model share them)")
    return {"ingest_efficiency": eff, "ingest_images_per_s": n / ingest_s, "tower_images_per_s": n / forward_s,
            "ingest_model": what, "ingest_images": desc}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--upscale", type=int, default=None, help="re-save the images this wide (stress decoding)")
    args = ap.parse_args()
    print(C.machine_line())
    run(args.quick, args.images, args.upscale)
