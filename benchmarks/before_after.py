"""Before/after re-ranking on real queries: what a user sees change.

    python benchmarks/before_after.py [--data ../shared/data/flickr8k] [--model flickr8k-dinov2s-minilm6]
        [--store DIR] [--show 3] [--scan 400] [--grid-dir DIR] [--json out.json]

Ingests the dev photos (``evaluate.ingested_split``, the user path; ``--store`` keeps the store between runs) and
sends ``--scan`` evenly spaced dev captions that name a colour or a person as text queries through
``Retriever.search`` with ``rerank_k=100`` (the default); the first-stage list is the same candidates in
``first_stage_rank`` order. For the queries whose top 5 changes it counts how often the photo the caption was
written for moves up or down (its rank within the 100 candidates), and prints the top 5 before and after of the
first ``--show`` changed queries (in scan order, whichever way the true photo moved) whose true photo is in either
top 5, marked with ``*``. ``--grid-dir`` also writes a PNG contact sheet per list. Exits 0 with a message without
data.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "flickr8k"


def rank_of(names: list[str], target: str) -> int | None:
    return names.index(target) + 1 if target in names else None


def compare(retriever, query: str, rerank_k: int) -> tuple[list, list]:
    """The ``rerank_k`` candidates in first-stage order, and re-ranked (one search: each result knows its
    ``first_stage_rank``)."""
    after = retriever.search(query, k=rerank_k, rerank_k=rerank_k)
    return sorted(after, key=lambda r: r.first_stage_rank), after


def run(data: Path, model: str, store: Path | None, show: int, scan: int, rerank_k: int,
        grid_dir: Path | None) -> dict:
    from edje_qdrant.evaluate import ingested_split, query_subset
    from edje_qdrant.render import write_grid
    from edje_qdrant.train.counterfeit import attributes

    report: dict = {"rerank_k": rerank_k, "scanned": 0, "top5_changed": 0, "true_up": 0, "true_down": 0,
                    "true_same": 0, "shown": []}
    with ingested_split(data / "captions.tsv", data / "images", "dev", model, store_path=store) as split:
        captions, caption_image = split.data.captions, split.data.caption_image
        named = [c for c in range(len(captions)) if attributes(captions[c])]
        for c in [named[int(i)] for i in query_subset(len(named), scan)]:
            query, true_name = captions[c], split.data.images[caption_image[c]]
            before, after = compare(split.retriever, query, rerank_k)
            names_b = [Path(r.path).name for r in before]
            names_a = [Path(r.path).name for r in after]
            report["scanned"] += 1
            if set(names_b[:5]) == set(names_a[:5]):
                continue
            report["top5_changed"] += 1
            rb, ra = rank_of(names_b, true_name), rank_of(names_a, true_name)
            key = "true_same" if rb == ra else ("true_up" if ra and (rb is None or ra < rb) else "true_down")
            report[key] += 1
            visible = (rb or 99) <= 5 or (ra or 99) <= 5
            if visible and len(report["shown"]) < show:
                report["shown"].append({"query": query, "true": true_name, "true_rank_before": rb,
                                        "true_rank_after": ra, "before": names_b[:5], "after": names_a[:5]})
                if grid_dir:
                    grid_dir.mkdir(parents=True, exist_ok=True)
                    n = len(report["shown"])
                    write_grid(query, before[:5], grid_dir / f"q{n}-before.png")
                    write_grid(query, after[:5], grid_dir / f"q{n}-after.png")
    return report


def print_report(report: dict) -> None:
    print(f"scanned {report['scanned']} dev captions naming a colour or a person; top 5 changed for "
          f"{report['top5_changed']}; of those the true photo moved up {report['true_up']}, down "
          f"{report['true_down']}, stayed {report['true_same']} (rank within rerank_k={report['rerank_k']})")
    for n, q in enumerate(report["shown"], 1):
        print(f"\n{n}. {q['query']!r}  true photo rank {q['true_rank_before']} -> {q['true_rank_after']}")
        print(f"   {'rank':<5}{'first stage (rerank_k=0)':<30}{'re-ranked (rerank_k=' + str(report['rerank_k']) + ')'}")
        for i, (b, a) in enumerate(zip(q["before"], q["after"]), 1):
            mark = lambda name: ("* " if name == q["true"] else "  ") + name  # noqa: E731
            print(f"   {i:<5}{mark(b):<30}{mark(a)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--model", default="flickr8k-dinov2s-minilm6")
    ap.add_argument("--store", type=Path, default=None, help="keep the ingested dev store here")
    ap.add_argument("--show", type=int, default=3)
    ap.add_argument("--scan", type=int, default=400)
    ap.add_argument("--rerank-k", type=int, default=100)
    ap.add_argument("--grid-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not (a.data / "captions.tsv").is_file():
        print(f"no Flickr8k data at {a.data}; nothing to compare")
        sys.exit(0)
    report = run(a.data, a.model, a.store, a.show, a.scan, a.rerank_k, a.grid_dir)
    print_report(report)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
