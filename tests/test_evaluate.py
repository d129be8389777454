"""eval: metric arithmetic on hand-made cases, and a small end-to-end run through ingest + Retriever."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edje_qdrant.errors import InputError
from edje_qdrant.evaluate import (
    collect,
    evaluate,
    first_stage_rank,
    query_ranks,
    recalls,
    rerank_order,
    rerank_ranks,
    summarise,
    tune_fusion_weight,
)


def test_recalls_from_ranks():
    ranks = np.array([0, 0, 3, 7, 12, 1_000_000, 4, 9, 10, 2])
    assert recalls(ranks) == {"r1": 20.0, "r5": 50.0, "r10": 70.0}


def test_first_stage_and_rerank_ranks_by_hand():
    first = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    logits = np.array([0.0, 5.0, 1.0, 9.0, 10.0])
    positive = np.array([False, False, True, False, False])
    assert first_stage_rank(first, positive) == 2
    # rerank top 3 by first stage: logits 0, 5, 1 -> order [1, 2, 0] -> positive at rank 1
    assert rerank_ranks(first, logits, positive, 3) == 1
    # rerank top 5: order by logit [4, 3, 1, 2, 0] -> positive at rank 3
    assert rerank_ranks(first, logits, positive, 5) == 3
    # a positive outside the re-ranked top k is a miss
    assert rerank_ranks(first, logits, positive, 2) >= 1_000_000
    # fusion: a huge first-stage weight restores the first-stage order
    assert rerank_ranks(first, logits, positive, 5, weight=1e6) == 2
    # ties in the logit are broken by first-stage order
    assert rerank_ranks(first, np.zeros(5), positive, 5) == 2


def test_rerank_order_matches_the_retriever_rules():
    first = np.array([0.9, 0.8, 0.8, 0.6, 0.5])
    # candidate 3 failed (NaN logit): keeps its first-stage slot 3; the rest sorted by logit, ties by position
    logits = np.array([1.0, 2.0, 2.0, np.nan, 3.0])
    assert rerank_order(first, logits, 5, 0.0).tolist() == [4, 1, 2, 3, 0]
    # with a first-stage weight: 1 + 20*0.9 = 19 > 2 + 20*0.8 = 18 (twice, a tie: position) > 3 + 20*0.5 = 13
    assert rerank_order(first, logits, 5, 20.0).tolist() == [0, 1, 2, 3, 4]
    assert rerank_order(first, logits, 5, 2.0).tolist() == [4, 1, 2, 3, 0]  # 4 > 3.6 = 3.6 > 2.8
    assert rerank_order(first, logits, 2, 0.0).tolist() == [1, 0]


def test_tune_fusion_weight_prefers_what_helps():
    first = np.array([0.9, 0.5])
    pos = np.array([True, False])
    helpful = [(first, np.array([0.0, 0.1]), pos)]  # logits slightly wrong, first stage right
    assert tune_fusion_weight(helpful, 2, grid=(0.0, 1.0)) == 1.0
    harmful = [(first, np.array([0.0, 1.0]), np.array([False, True]))]
    assert tune_fusion_weight(harmful, 2, grid=(0.0, 1.0)) == 0.0


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory, demo_folder):
    rows = ["image\tcaption_idx\tsplit\tcaption"]
    images = tmp_path_factory.mktemp("evalimgs")
    for path in sorted(demo_folder.rglob("*.png")) + sorted(demo_folder.rglob("*.jpg")):
        name = f"{path.parent.name}-{path.name}"
        (images / name).write_bytes(path.read_bytes())
        caption = (path.parent / f"{path.name}.txt").read_text().strip()
        for i, text in enumerate([caption, f"{caption} in a picture"]):
            rows.append(f"{name}\t{i}\t{'dev' if len(rows) < 17 else 'train'}\t{text}")
    tsv = tmp_path_factory.mktemp("evalcap") / "captions.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    return tsv, images


def test_evaluate_end_to_end_json_shape(captions_file, tiny_model):
    tsv, images = captions_file
    out = evaluate(tsv, images, "dev", tiny_model, rerank_ks=(2, 5))
    assert out["images"] == 8 and out["queries"] == {"t2i": 16, "i2t": 8}
    keys = {f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    assert set(out["first_stage"]) == keys
    assert set(out["reranked"]) == {"2", "5"} and set(out["reranked"]["5"]) == keys
    assert set(out["logit_only"]) == {"2", "5"} and set(out["logit_only"]["5"]) == keys
    assert set(out["fused_tuned"]) == {"2", "5"} and {"t2i_weight", "i2t_weight"} <= set(out["fused_tuned"]["5"])
    assert "fused" not in out and out["fusion_weight"] == tiny_model.fusion_weight
    assert out["seconds_per_query"] > 0
    for k in ("2", "5"):
        for d in ("t2i", "i2t"):
            entry = out["delta_r1"][k][d]
            lo, hi = entry["ci95"]
            assert lo <= entry["delta_r1"] <= hi
            gain = out["reranked"][k][f"{d}_r1"] - out["first_stage"][f"{d}_r1"]
            assert entry["delta_r1"] == pytest.approx(gain, abs=0.02)
    for value in out["first_stage"].values():
        assert 0.0 <= value <= 100.0
    # R@10 with only 8 images is 100 % in the first stage (every positive is found)
    assert out["first_stage"]["t2i_r10"] == 100.0 and out["first_stage"]["i2t_r10"] == 100.0


def test_eval_cli_json_and_errors(captions_file, tmp_path):
    from edje_qdrant.cli.main import main

    tsv, images = captions_file
    res = CliRunner().invoke(main, ["eval", "--captions", str(tsv), "--images", str(images), "--split", "dev",
                                    "--model", "tiny-random", "--rerank-k", "2,4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(out["reranked"]) == {"2", "4"}
    for key in ("first_stage", "reranked", "logit_only", "fused_tuned", "delta_r1", "fusion_weight"):
        assert key in out
    assert set(out["delta_r1"]["4"]) == {"t2i", "i2t"} and len(out["delta_r1"]["4"]["t2i"]["ci95"]) == 2
    res = CliRunner().invoke(main, ["eval", "--captions", str(tsv), "--images", str(images), "--split", "dev",
                                    "--model", "tiny-random", "--rerank-k", "4,100"])
    assert res.exit_code == 0, res.output
    assert "first stage" in res.output and "rerank 100" in res.output
    assert "R@1 gain, rerank 100: T2I" in res.output and "95 % interval" in res.output
    res = CliRunner().invoke(main, ["eval", "--captions", str(tsv), "--images", str(images), "--split", "test",
                                    "--model", "tiny-random"])
    assert res.exit_code == 1 and "split" in res.output and "Traceback" not in res.output
    with pytest.raises(InputError, match="missing"):
        evaluate(tsv, tmp_path, "dev", "tiny-random")


def test_reranked_is_exactly_what_search_returns(captions_file, tiny_model, tmp_path, monkeypatch):
    """reranked[k] (t2i) ranks the positive where ``Retriever.search(caption, k=k, rerank_k=k)`` puts it, with a
    non-zero model fusion_weight so that the default score differs from the logit alone."""
    from edje_qdrant.ingestion.ids import sha256_file
    from edje_qdrant.schema import point_id
    from edje_qdrant.retriever import Retriever
    from edje_qdrant.store import open_store
    from edje_qdrant.train.data import caption_set, read_captions

    monkeypatch.setattr(tiny_model, "fusion_weight", 3.0)
    tsv, images = captions_file
    ks = [2, 5, 8]
    runs = collect(tsv, images, "dev", tiny_model, k_max=10, store_path=tmp_path / "store")
    out = summarise(runs, ks)
    assert out["fusion_weight"] == 3.0
    data = caption_set(read_captions(tsv), "dev")
    ids = [point_id(sha256_file(images / n)[0]) for n in data.images]
    store = open_store(path=str(tmp_path / "store"))
    try:
        retriever = Retriever(store, "eval-dev-fp16", tiny_model)
        for k in ks:
            expected = []
            for caption, image in zip(data.captions, data.caption_image):
                found = [r.id for r in retriever.search(caption, k=k, rerank_k=k)]
                expected.append(found.index(ids[image]) if ids[image] in found else 1_000_000)
            assert query_ranks(runs.t2i, k, runs.fusion_weight).tolist() == expected, k
            reported = {m: v for m, v in out["reranked"][str(k)].items() if m.startswith("t2i_")}
            assert reported == {f"t2i_{m}": v for m, v in recalls(np.array(expected)).items()}
    finally:
        store.close()
    # not trivial: with this weight the default order differs from the logit-only order
    assert any((rerank_order(f, lg, 8, 3.0) != rerank_order(f, lg, 8, 0.0)).any() for f, lg, _ in runs.t2i)
