"""The binding ablation table of the model card, from the harness's JSON lines.

    python benchmarks/binding_ablation_table.py [--runs bind1,word1,deep1] [--file runs/ablations/ablations.jsonl]

For each run written by ``benchmarks/reranker_ablation.py``: its levers (options that differ from the first
run's), the step the held-back validation kept, and on the 300 held-back training images the start (= the first
stage) against the step with the best mean binding accuracy (per kind, and T2I/I2T R@1 at that step); then the
dev numbers of the kept state (binding per kind, R@1 of colour/person queries, overall R@1 change). Prints
Markdown.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("colour_replaced", "colours_swapped", "person_swapped", "count_changed", "roles_swapped")
SHORT = {"colour_replaced": "colour", "colours_swapped": "swap", "person_swapped": "person",
         "count_changed": "count", "roles_swapped": "roles"}


def load(path: Path, names: list[str]) -> list[dict]:
    """The last line of each named run, in the order asked."""
    runs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        runs[row["name"]] = row
    missing = [n for n in names if n not in runs]
    if missing:
        raise SystemExit(f"no run named {', '.join(missing)} in {path}")
    return [runs[n] for n in names]


def levers(row: dict, base: dict) -> str:
    """Options that differ from ``base``'s (an option ``base`` predates counts as its default)."""
    from dataclasses import fields

    from edje_qdrant.train.split_reranker import SplitTrainOptions

    defaults = {f.name: f.default for f in fields(SplitTrainOptions) if not callable(f.default_factory)}
    changed = {k: v for k, v in row["options"].items() if base["options"].get(k, defaults.get(k)) != v}
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(changed.items())) or "the recipe below"


def kept_step(row: dict) -> int:
    """The step whose state training kept: the best ``val_score`` (the training rule), the earliest on ties."""
    from edje_qdrant.train.split_reranker import val_score

    return max(row["val_curve"], key=lambda v: (val_score(v), -v["step"]))["step"]


def val_row(point: dict) -> str:
    kinds = " / ".join(f"{point['binding_' + k]:.1f}" for k in KINDS)
    return f"{point['binding']:.1f} ({kinds}); R@1 {point['t2i_r1']:.1f} / {point['i2t_r1']:.1f}"


def table(rows: list[dict]) -> str:
    out = ["| run | levers (vs the first run) | steps, kept | held-back val at the start (= first stage): mean "
           "binding (colour / swap / person / count / roles); T2I / I2T R@1 | best-binding step: the same | dev, "
           "kept state: binding colour / swap / person; colour-or-person T2I R@1; overall T2I / I2T ΔR@1 |",
           "|---|---|---|---|---|---|"]
    for row in rows:
        curve = row["val_curve"]
        best = max(curve[1:] or curve, key=lambda v: v["binding"])
        dev_b = " / ".join(f"{row['binding'][k]['reranked']['percent']:.1f}" for k in KINDS[:3])
        attr = row["attribute_queries"]
        out.append(
            f"| {row['name']} | {levers(row, rows[0])} | {row['steps']}, {kept_step(row)} | {val_row(curve[0])} | "
            f"step {best['step']}: {val_row(best)} | {dev_b}; {attr['reranked_r1']:.2f} ({attr['queries']} q); "
            f"{row['t2i_delta_r1']['mean']:+.2f} / {row['i2t_delta_r1']['mean']:+.2f} |")
    first = rows[0]
    out.append("")
    out.append("First run's recipe: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(first["options"].items())))
    out.append(f"Dev first stage: binding colour / swap / person "
               + " / ".join(f"{first['binding'][k]['first_stage']['percent']:.1f}" for k in KINDS[:3])
               + f"; colour-or-person T2I R@1 {first['attribute_queries']['first_r1']:.2f}.")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="bind1,word1,deep1")
    ap.add_argument("--file", type=Path, default=ROOT / "runs" / "ablations" / "ablations.jsonl")
    a = ap.parse_args()
    print(table(load(a.file, a.runs.split(","))))


if __name__ == "__main__":
    main()
