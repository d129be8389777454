"""Run every benchmark and print its table; ``--json [PATH]`` also writes one JSON summary (stdout when no PATH).

    python benchmarks/run.py [--quick] [--json [out.json]] [--only split,rerank,search,ingest,storage,blip,sync,ray,cli]

Targets (issues 5, 11 and 12) are checked at the end against the numbers of this run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SECTIONS = ("split", "rerank", "search", "ingest", "storage", "blip", "sync", "ray", "cli")
EXTRA_SECTIONS = ("siglip2",)  # paper-configuration cost row (issue 4): only with --only siglip2 (slow on a CPU)


def targets(s: dict[str, Any]) -> list[list[Any]]:
    """(target, value, limit, met) rows; None values are not measured in this run."""
    def row(name: str, value: Any, limit: str, ok: Any) -> list[Any]:
        return [name, value, limit, None if value is None else ("yes" if ok else "NO")]

    v = s.get
    return [
        row("split joint encoder, rerank_k=100, default preset (ms p50)", v("split_rerank_ms_p50_k100"), "<= 150",
            (v("split_rerank_ms_p50_k100") or 1e9) <= 150),
        row("split joint encoder, rerank_k=100 (ms p50), stretch", v("split_rerank_ms_p50_k100"), "<= 60",
            (v("split_rerank_ms_p50_k100") or 1e9) <= 60),
        row("training pairs/s, split vs full joint (x)", v("split_train_speedup"), ">= 10",
            (v("split_train_speedup") or 0) >= 10),
        row("full-joint rerank stage, rerank_k=100 (ms p50)", v("cpu_rerank_ms_p50_k100"), "<= 60",
            (v("cpu_rerank_ms_p50_k100") or 1e9) <= 60),
        row("payload fetch + decode, rerank_k=100 (ms)", v("fetch_decode_ms_k100"), "<= 3",
            (v("fetch_decode_ms_k100") or 1e9) <= 3),
        row("whole search, rerank_k=100 (ms p50)", v("search_ms_p50_k100"), "<= 150",
            (v("search_ms_p50_k100") or 1e9) <= 150),
        row("GPU pairs/s, MiniLM-L12 m=64 bf16", v("gpu_pairs_per_s"), ">= 100,000",
            (v("gpu_pairs_per_s") or 0) >= 100_000),
        row("ingest efficiency", v("ingest_efficiency"), ">= 0.95", (v("ingest_efficiency") or 0) >= 0.95),
        row("int8 blob (bytes)", v("blob_bytes_int8"), "<= 24,800", (v("blob_bytes_int8") or 1e9) <= 24_800),
        row("Ray ingest, 2 workers vs single process (x, one machine)", v("ray_vs_single_2"), ">= 0.90",
            (v("ray_vs_single_2") or 0) >= 0.90),
        row("CLI `search`, fresh process, default preset (s p50)", v("cli_search_s_p50"), "<= 3",
            (v("cli_search_s_p50") or 1e9) <= 3),
        row("CLI `search --image`, fresh process, default preset (s p50)", v("cli_search_image_s_p50"), "<= 3",
            (v("cli_search_image_s_p50") or 1e9) <= 3),
        row("CLI errors before any model loads, worst case (s p50)", v("cli_error_s_p50"), "<= 1",
            (v("cli_error_s_p50") or 1e9) <= 1),
        row("CLI --help (s p50)", v("cli_help_s_p50"), "<= 0.5", (v("cli_help_s_p50") or 1e9) <= 0.5),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of every script")
    ap.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the JSON summary to PATH (stdout without PATH)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    ap.add_argument("--workdir", default=None, help="where temporary stores and images go (default: system tmp)")
    args = ap.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(SECTIONS) - set(EXTRA_SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS + EXTRA_SECTIONS)}")

    t_start = time.perf_counter()
    print(C.machine_line(), flush=True)
    print(f"mode: {'quick (smoke test sizes)' if args.quick else 'full'}", flush=True)
    results: dict[str, Any] = {"machine": C.machine(), "quick": args.quick}
    seconds: dict[str, float] = {}
    for name in only:
        t0 = time.perf_counter()
        if name == "split":
            import bench_split

            results["split"] = bench_split.run(args.quick)
        elif name == "rerank":
            import bench_rerank

            results["rerank"] = bench_rerank.run(args.quick)
        elif name == "search":
            import bench_search

            results["search"] = bench_search.run(args.quick, workdir=args.workdir)
        elif name == "ingest":
            import bench_ingest

            results["ingest"] = bench_ingest.run(args.quick, workdir=args.workdir)
        elif name == "storage":
            import bench_storage

            results["storage"] = bench_storage.run(args.quick, workdir=args.workdir)
        elif name == "blip":
            import bench_blip

            results["blip"] = bench_blip.run(args.quick)
        elif name == "sync":
            import bench_sync

            results["sync"] = bench_sync.run(args.quick, workdir=args.workdir)
        elif name == "ray":
            try:
                import ray  # noqa: F401  (optional extra)
            except ImportError:
                print("\n## ray: skipped (Ray is not installed: pip install -e \".[ray]\")", flush=True)
                continue
            import bench_ray

            results["ray"] = bench_ray.run(args.quick, workdir=args.workdir)
        elif name == "cli":
            import bench_cli

            results["cli"] = bench_cli.run(args.quick, workdir=args.workdir)
        elif name == "siglip2":
            import bench_siglip2

            results["siglip2"] = bench_siglip2.run(args.quick)
        seconds[name] = time.perf_counter() - t0

    r = results
    rr = r.get("rerank", {})
    default_precision = "fp32"  # the CPU default kept by load_model (see the report in bench_rerank's table)
    sp = r.get("split", {})
    summary: dict[str, Any] = {
        "split_rerank_ms_p50_k100": sp.get("cpu_rerank_ms_p50_k100"),
        "split_rerank_ms_p50_k100_fp32": (sp.get("rerank_ms_p50_k100_fp32") or {}).get("after"),
        "split_rerank_ms_p50_k100_bf16": (sp.get("rerank_ms_p50_k100_bf16") or {}).get("after"),
        "full_joint_rerank_ms_p50_k100_fp32": (sp.get("rerank_ms_p50_k100_fp32") or {}).get("before"),
        "split_train_pairs_per_s": sp.get("train_pairs_per_s_fp32"),
        "split_train_speedup": sp.get("train_speedup"),
        "split_model": sp.get("after"),
        "cpu_rerank_ms_p50_k100": (rr.get("cpu_rerank_ms_p50_k100_by_precision") or {}).get(default_precision),
        "cpu_rerank_ms_p50_k100_by_precision": rr.get("cpu_rerank_ms_p50_k100_by_precision"),
        "cpu_default_precision": default_precision,
        "rerank_model": rr.get("model_used"),
        "fetch_decode_ms_k100": r.get("search", {}).get("fetch_decode_ms_k100"),
        "search_ms_p50_k100": r.get("search", {}).get("search_ms_p50_k100"),
        "search_rerank_stage_ms_p50_k100": r.get("search", {}).get("rerank_stage_ms_p50_k100"),
        "search_points": r.get("search", {}).get("points"),
        "search_model": r.get("search", {}).get("model_used"),
        "ingest_efficiency": r.get("ingest", {}).get("ingest_efficiency"),
        "ingest_images_per_s": r.get("ingest", {}).get("ingest_images_per_s"),
        "blob_bytes_fp16": r.get("storage", {}).get("blob_bytes_fp16"),
        "blob_bytes_int8": r.get("storage", {}).get("blob_bytes_int8"),
        "int8_storage_rerank_cost": r.get("storage", {}).get("int8_rerank_cost"),
        "blip_style_cost_ratio": r.get("blip", {}).get("blip_style_cost_ratio"),
        "blip_style_cost_ratio_vitl": r.get("blip", {}).get("blip_style_cost_ratio_vitl"),
        "gpu_pairs_per_s": rr.get("gpu_pairs_per_s"),
        "sync_scan_points_per_s": r.get("sync", {}).get("scroll_metadata_points_per_s"),
        "sync_scan_per_point_vs_hash_3mb": r.get("sync", {}).get("scan_per_point_vs_hash_3mb"),
        "sync_reingest_overhead_ratio": r.get("sync", {}).get("sync_overhead_ratio"),
        "ray_images_per_s": r.get("ray", {}).get("ray_images_per_s"),
        "ray_vs_single_2": (r.get("ray", {}).get("ray_vs_single") or {}).get("ray_2"),
        "cli_search_s_p50": r.get("cli", {}).get("search_s_p50"),
        "cli_search_image_s_p50": r.get("cli", {}).get("search_image_s_p50"),
        "cli_error_s_p50": r.get("cli", {}).get("error_s_p50_worst"),
        "cli_help_s_p50": r.get("cli", {}).get("help_s_p50"),
        "siglip2_cost_ratio": r.get("siglip2", {}).get("siglip2_cost_ratio"),
        "machine": results["machine"],
        "quick": args.quick,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    C.table("Targets (issues 5, 11, 12 and 14), this run", ["target", "value", "limit", "met"], targets(summary),
            ("quick mode: rerank/search values are at the largest rerank_k measured (30 / 50), 1k points; the Ray "
             "row needs the full size (its ~10 s start dominates 16 images); "
             if args.quick else "") + f"total {time.perf_counter() - t_start:.0f} s; sections: " +
            ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"; load avg now {C.load_average():.2f}")
    if args.json:
        text = json.dumps(summary, indent=2, default=_jsonable)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
            print(f"\nJSON summary written to {args.json}")
    return summary


def _jsonable(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


if __name__ == "__main__":
    main()
