"""Binding benchmark: the table arithmetic on hand-made scores, the change rates, and one end-to-end run through
ingest + Retriever on real Flickr8k photos with their real captions."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FLICKR
from edje_qdrant.binding import binding_table, change_rates, evaluate_binding, recall_subset
from edje_qdrant.train.counterfeit import BindingPair


def _pair(kind: str, prior_true: float = 0.0, prior_fake: float = -1.0) -> BindingPair:
    return BindingPair(0, kind, "true", "fake", "", prior_true, prior_fake)


def test_binding_table_counts_the_default_score_not_the_logit_alone():
    pairs = [_pair("colour_replaced"), _pair("colour_replaced", -1.0, 0.0), _pair("person_swapped")]
    scored = {"first_true": np.array([0.30, 0.20, 0.10]), "first_fake": np.array([0.20, 0.25, 0.10]),
              "logit_true": np.array([-1.0, 1.0, 0.5]), "logit_fake": np.array([0.0, 0.0, 0.5])}
    table = binding_table(pairs, scored, weight=20.0)
    colour = table["colour_replaced"]
    assert colour["pairs"] == 2 and colour["first_stage"]["percent"] == 50.0
    # pair 0: -1 + 6 = 5 > 0 + 4 = 4 (right); pair 1: 1 + 4 = 5 = 0 + 5 (a tie: half)
    assert colour["reranked"]["percent"] == 75.0 and colour["delta"]["points"] == 25.0
    assert colour["prior"]["percent"] == 50.0
    person = table["person_swapped"]  # equal scores both ways: a tie counts half
    assert person["first_stage"]["percent"] == 50.0 and person["reranked"]["percent"] == 50.0
    assert binding_table(pairs, scored, weight=0.0)["colour_replaced"]["reranked"]["percent"] == 50.0
    lo, hi = colour["reranked"]["ci95"]
    assert lo <= 75.0 <= hi


def test_change_rates_and_subset_recall_by_hand():
    first = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    stays = (first, np.zeros(6), np.array([True, False, False, False, False, False]))
    new_top1 = (first, np.array([0.0, 5.0, 0, 0, 0, 0]), np.array([False, True, False, False, False, False]))
    new_in_top5 = (first, np.array([0, 0, 0, 0, 0, 5.0]), np.array([False] * 6))
    out = change_rates([stays, new_top1, new_in_top5], k=6, weight=1.0)
    # query 1 swaps the first two (same top-5 set); query 2 moves the 6th to the top: both change
    assert out["top1_changed"]["percent"] == 66.7 and out["top5_changed"]["percent"] == 33.3
    sub = recall_subset([stays, new_top1, new_in_top5], [False, True, True], k=6, weight=1.0)
    assert sub["queries"] == 2 and sub["first_stage_r1"] == 0.0 and sub["reranked_r1"] == 50.0


@pytest.fixture(scope="module")
def flickr_captions(tmp_path_factory):
    """24 dev photos whose captions name colours or people, and 5,000 train captions (for the prior)."""
    tsv = FLICKR / "captions.tsv"
    if not tsv.is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR}")
    with tsv.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    dev = sorted({r["image"] for r in rows if r["split"] == "dev" and (" man " in r["caption"]
                                                                         or " red " in r["caption"])})[:24]
    train = [r for r in rows if r["split"] == "train"][:5000]  # enough for the bigram rules and the prior
    keep = train + [r for r in rows if r["image"] in dev]
    out = tmp_path_factory.mktemp("binding") / "captions.tsv"
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption_idx", "split", "caption"], delimiter="\t",
                                quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in keep)
    return out, FLICKR / "images"


def test_binding_benchmark_end_to_end(flickr_captions, tiny_model, monkeypatch):
    tsv, images = flickr_captions
    report = evaluate_binding(tsv, images, "dev", tiny_model, rerank_k=10)
    assert report["overall"]["images"] == 24 and report["rerank_k"] == 10
    assert {"colour_replaced", "person_swapped"} <= set(report["binding"])
    for row in report["binding"].values():
        assert row["prior"]["percent"] == 50.0 and row["pairs"] % 2 == 0  # balanced against the prior
        lo, hi = row["first_stage"]["ci95"]
        assert lo <= row["first_stage"]["percent"] <= hi
    queries = report["attribute_queries"]["colour_or_person"]["queries"]
    assert 0 < queries <= 120 and report["changes"]["all"]["queries"] == 120
    # a first-stage weight that dwarfs every logit makes the default score rank like the first stage
    monkeypatch.setattr(tiny_model, "fusion_weight", 1e9)
    again = evaluate_binding(tsv, images, "dev", tiny_model, rerank_k=10, max_queries=5)
    for kind, row in again["binding"].items():
        assert row["reranked"]["percent"] == row["first_stage"]["percent"] == report["binding"][kind][
            "first_stage"]["percent"]
    assert again["changes"]["all"]["top1_changed"]["percent"] == 0.0


def test_eval_binding_cli(flickr_captions):
    from edje_qdrant.cli.main import main

    tsv, images = flickr_captions
    args = ["eval", "--binding", "--captions", str(tsv), "--images", str(images), "--model", "tiny-random",
            "--rerank-k", "10", "--max-queries", "4"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "colour_replaced" in res.output and "first stage" in res.output and "prior" in res.output
    assert "top 1 of" in res.output
    res = CliRunner().invoke(main, args + ["--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["binding"]
