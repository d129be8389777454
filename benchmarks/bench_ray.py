"""Distributed ingest overhead: images/s of ``ingest(..., executor="ray")`` with 1 and 2 Ray workers against the
single-process pipeline, same images, same model, same batch size, Edge store (the driver is the one writer).
``vs single`` compares whole runs; ``steady vs single`` compares the Ray rate after its first stored batch with
the single-process whole-run rate, i.e. what a long run converges to once the fixed start is paid.

On one machine Ray buys no compute (the workers share the same cores); the point is what it costs: the
``vs single`` column is Ray images/s / single-process images/s over the whole run, and the ``steady`` columns
leave out the fixed start (hash tasks, actors loading the model) by timing from the first stored batch.

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

import torch

import _common as C
from bench_ingest import ingest_model, make_images
from edje_qdrant.ingest import ingest
from edje_qdrant.store import EdgeStore


def _timed(folder: Path, store_dir: Path, model: Any, bs: int, **kwargs: Any) -> dict[str, float]:
    """Whole-run seconds and images/s, plus the rate after the first stored batch (the fixed start left out)."""
    marks: list[tuple[float, int]] = []
    opts = kwargs.get("ray_options")
    if opts is not None:
        from dataclasses import replace

        kwargs["ray_options"] = replace(opts, on_batch=lambda r: marks.append((time.perf_counter(), r.ingested)))
    store = EdgeStore(store_dir)
    t0 = time.perf_counter()
    report = ingest(folder, store, model, "bench", batch_size=bs, **kwargs)
    total = time.perf_counter() - t0
    store.close()
    out = {"seconds": total, "images_per_s": report.ingested / total, "ingested": report.ingested}
    if len(marks) >= 2:
        (t_first, n_first), (t_last, n_last) = marks[0], marks[-1]
        out["start_s"] = t_first - t0
        out["steady_images_per_s"] = (n_last - n_first) / (t_last - t_first) if t_last > t_first else None
    return out


def run(quick: bool = False, images: int | None = None, workdir: str | None = None) -> dict[str, Any]:
    import ray

    from edje_qdrant.ingest.distributed import RayOptions

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
    rows, results = [], {}
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            folder = Path(tmp) / "images"
            desc = make_images(folder, n, None)
            single = _timed(folder, Path(tmp) / "single", model, bs)
            results["single"] = single
            rows.append(["single process (decode threads + model)", n, single["seconds"], single["images_per_s"], 1.0,
                         None, None, None])
            for workers in (1, 2):
                opts = RayOptions(workers=workers, cpus_per_worker=max(1.0, cpus / workers))
                r = _timed(folder, Path(tmp) / f"ray{workers}", model, bs, executor="ray", ray_options=opts)
                results[f"ray_{workers}"] = r
                steady = r.get("steady_images_per_s")
                rows.append([f"Ray, {workers} worker(s) x {opts.cpus_per_worker:g} CPU", n, r["seconds"],
                             r["images_per_s"], r["images_per_s"] / single["images_per_s"], r.get("start_s"), steady,
                             steady / single["images_per_s"] if steady else None])
    finally:
        ray.shutdown()
    for key, r in results.items():
        if r["ingested"] != n:
            raise RuntimeError(f"{key}: stored {r['ingested']} of {n} images")
    C.table("Distributed ingest on Ray vs the single-process pipeline (same images, batch, Edge store)",
            ["path", "images", "seconds", "images/s", "vs single", "start s", "steady img/s", "steady vs single"],
            rows,
            f"model: {what}; images: {desc}; batch {bs}; {cpus} CPUs shared by everything; Ray start "
            f"{init_s:.1f} s (not in the rows); load avg now {C.load_average():.2f}")
    return {
        "ray_images_per_s": {k: v["images_per_s"] for k, v in results.items()},
        "ray_vs_single": {k: v["images_per_s"] / results["single"]["images_per_s"] for k, v in results.items()
                          if k != "single"},
        "ray_steady_images_per_s": {k: v.get("steady_images_per_s") for k, v in results.items() if k != "single"},
        "ray_steady_vs_single": {k: (v.get("steady_images_per_s") or 0) / results["single"]["images_per_s"]
                                 for k, v in results.items() if k != "single"},
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
