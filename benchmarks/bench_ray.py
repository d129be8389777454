"""Distributed ingest overhead: images/s of ``ingest(..., executor="ray")`` with 1 and 2 Ray workers against the
single-process pipeline, same images, same model, same batch size, Edge store (the driver is the one writer).

On one machine Ray buys no compute (the workers share the same cores); the point is what it costs. The
single-process run goes first and last (after a warm-up forward), and ``vs single`` divides by the mean of the two,
so drift of the shared machine's load shows up as the gap between them. ``first batch s`` is when the first batch
was stored: the fixed start (hash tasks, actors importing torch and building the model) plus one batch.

    python benchmarks/bench_ray.py [--quick] [--images N]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import _common as C
from bench_ingest import ingest_model, make_images
from edje_qdrant.ingestion import ingest
from edje_qdrant.store import EdgeStore


def _timed(folder: Path, store_dir: Path, model: Any, bs: int, **kwargs: Any) -> dict[str, float]:
    """Whole-run seconds and images/s; with Ray also when the first batch was stored."""
    marks: list[float] = []
    opts = kwargs.get("ray_options")
    if opts is not None:
        from dataclasses import replace

        kwargs["ray_options"] = replace(opts, on_batch=lambda r: marks.append(time.perf_counter()))
    store = EdgeStore(store_dir)
    t0 = time.perf_counter()
    report = ingest(folder, store, model, "bench", batch_size=bs, **kwargs)
    total = time.perf_counter() - t0
    store.close()
    return {"seconds": total, "images_per_s": report.ingested / total, "ingested": report.ingested,
            "first_batch_s": marks[0] - t0 if marks else None}


def run(quick: bool = False, images: int | None = None, workdir: str | None = None) -> dict[str, Any]:
    import ray

    from edje_qdrant.ingestion.distributed import RayOptions

    torch.set_grad_enabled(False)
    n = images or (16 if quick else 192)
    model, what = ingest_model()
    bs = min(int(model.image_batch_size), 16)  # several batches per worker, so 2 workers share the images
    cpus = os.cpu_count() or 2
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
             log_to_driver=False)
    init_s = time.perf_counter() - t0
    logging.getLogger("ray").setLevel(logging.WARNING)
    results: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            folder = Path(tmp) / "images"
            desc = make_images(folder, n, None)
            warm = np.stack([model.vision.preprocess(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())[:4]])
            model.embed_images(warm)  # first-forward costs out of the first timed run
            results["single"] = _timed(folder, Path(tmp) / "single", model, bs)
            for workers in (1, 2):
                opts = RayOptions(workers=workers, cpus_per_worker=max(1.0, cpus / workers))
                results[f"ray_{workers}"] = _timed(folder, Path(tmp) / f"ray{workers}", model, bs, executor="ray",
                                                   ray_options=opts)
            results["single_again"] = _timed(folder, Path(tmp) / "single-again", model, bs)
    finally:
        ray.shutdown()
    for key, r in results.items():
        if r["ingested"] != n:
            raise RuntimeError(f"{key}: stored {r['ingested']} of {n} images")
    ref = (results["single"]["images_per_s"] + results["single_again"]["images_per_s"]) / 2
    names = {"single": "single process, first", "ray_1": f"Ray, 1 worker x {max(1.0, cpus):g} CPU",
             "ray_2": f"Ray, 2 workers x {max(1.0, cpus / 2):g} CPU", "single_again": "single process, again"}
    order = ("single", "ray_1", "ray_2", "single_again")
    rows = [[names[k], n, results[k]["seconds"], results[k]["images_per_s"], results[k]["images_per_s"] / ref,
             results[k]["first_batch_s"]] for k in order]
    C.table("Distributed ingest on Ray vs the single-process pipeline (same images, batch, Edge store)",
            ["run (in this order)", "images", "seconds", "images/s", "vs single (mean)", "first batch s"], rows,
            f"model: {what}; images: {desc}; batch {bs}; {cpus} CPUs shared by everything (other jobs too: load avg "
            f"now {C.load_average():.2f}); Ray start {init_s:.1f} s, not in the rows")
    return {
        "ray_images_per_s": {k: v["images_per_s"] for k, v in results.items()},
        "ray_vs_single": {k: results[k]["images_per_s"] / ref for k in ("ray_1", "ray_2")},
        "ray_first_batch_s": {k: results[k]["first_batch_s"] for k in ("ray_1", "ray_2")},
        "ray_init_s": init_s,
        "ray_model": what,
        "ray_images": desc,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    args = ap.parse_args()
    print(C.machine_line())
    run(args.quick, args.images)
