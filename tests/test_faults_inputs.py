"""Input validation and model mismatch at the command line (and the argument checks the CLI shares with the
library): every bad input is a one-line `Error: ...` naming the option and the fix, exit code 1 (2 for click's
own usage errors), never a traceback; nothing is written by a refused command."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from edje_qdrant.cli.main import main
from edje_qdrant.errors import InputError
from edje_qdrant.ingestion import ingest
from edje_qdrant.models import load_model
from edje_qdrant.models.official import save_compact
from edje_qdrant.search_args import check_search_args
from edje_qdrant.store import EdgeStore, open_store


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(res, *fragments: str, code: int = 1) -> str:
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # not an uncaught exception
    out = res.output.strip()
    assert "Traceback" not in out
    if code == 1:
        assert out.startswith("Error: ") and len(out.splitlines()) == 1, out
    for f in fragments:
        assert f in out, out
    return out


@pytest.fixture(scope="module")
def filled(tmp_path_factory, demo_folder, tiny_model):
    """An embedded store with the 12 demo images (closed again: the CLI opens it in this process)."""
    path = tmp_path_factory.mktemp("inputs") / "store"
    store = open_store(path=str(path))
    assert ingest(demo_folder, store, tiny_model, "images").ingested == 12
    store.close()
    return path


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """A model directory of the tiny-random preset with other weights: another fingerprint, same shapes."""
    model = load_model("tiny-random", device="cpu")
    with torch.no_grad():
        for p in model.reranker.parameters():
            p.add_(0.01)
    return save_compact(model.reranker, tmp_path_factory.mktemp("other") / "model", preset="tiny-random")


def count(path) -> int:
    with EdgeStore(path) as s:
        return s.count("images")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["", ], ["query is empty"]),
        ([" \t\n "], ["query is empty"]),
        (["x" * 10_001], ["10001 characters", "limit is 10000"]),
        (["a dog", "-k", "0"], ["k must be at least 1"]),
        (["a dog", "-k", "-3"], ["k must be at least 1"]),
        (["a dog", "--rerank-k", "-1"], ["rerank_k must be 0 (no re-ranking) or positive"]),
        (["a dog", "-k", "10001", "--rerank-k", "0"], ["k=10001 is above the limit of 10000"]),
        (["a dog", "--rerank-k", "10001"], ["rerank_k=10001 is above the limit"]),
        (["caf\udcff"], ["not valid Unicode", "lone surrogate"]),  # undecodable argv bytes
    ],
    ids=["empty", "whitespace", "10001-chars", "k=0", "k<0", "rerank_k<0", "k-too-big", "rerank_k-too-big",
         "surrogate"],
)
def test_bad_search_arguments(filled, args, fragments):
    res = cli("search", *args, "--store", str(filled))
    assert_one_line_error(res, *fragments)


def test_non_integer_k_is_a_usage_error(filled):
    res = cli("search", "a dog", "-k", "2.5", "--store", str(filled))
    assert_one_line_error(res, "'2.5' is not a valid integer", code=2)


@pytest.mark.parametrize("query", [("a dog\x00\x07 on\tthe \x1b[31mbeach\u200b " * 400)[:10_000], "\x00\x01\x7f"],
                         ids=["10000-chars-with-controls", "controls-only"])
def test_control_characters_and_the_longest_query_are_searched(filled, query):
    res = cli("search", query, "--store", str(filled), "-k", "3", "--rerank-k", "6", "--json")
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)
    assert len(hits) == 3 and all(isinstance(h["rerank_score"], float) for h in hits)


@pytest.mark.parametrize("value", [2.5, True, "5", None, -1, 10_001])
def test_library_rejects_non_integer_or_out_of_range_k(value):
    with pytest.raises(InputError, match="k"):
        check_search_args("a dog", value, 100)
    with pytest.raises(InputError, match="rerank_k" if value != -1 else "rerank_k must be 0"):
        check_search_args("a dog", 1, value)


def test_unknown_preset(filled, tmp_path, demo_folder):
    res = cli("search", "a dog", "--store", str(filled), "--model", "no-such-preset")
    assert_one_line_error(res, "unknown model 'no-such-preset'", "tiny-random")
    res = cli("ingest", str(demo_folder), "--store", str(tmp_path / "s"), "--model", "no-such-preset")
    assert_one_line_error(res, "unknown model 'no-such-preset'", "tiny-random")
    assert not (tmp_path / "s").exists()  # refused before the store was created


def test_a_file_instead_of_a_folder(tmp_path, demo_folder):
    a_file = next(demo_folder.rglob("*.png"))
    res = cli("ingest", str(a_file), "--store", str(tmp_path / "s"), "--model", "tiny-random")
    assert_one_line_error(res, str(a_file), "is not a directory", "pass the folder")
    with EdgeStore(tmp_path / "s") as s:
        assert s.get_spec("images") is None  # nothing created


def test_collection_built_by_another_codec_or_model_is_refused(filled, demo_folder, other_model_dir):
    before = count(filled)
    res = cli("ingest", str(demo_folder), "--store", str(filled), "--model", "tiny-random", "--dtype", "int8")
    assert_one_line_error(res, "codec: recorded 'edje-tokens/v1/fp16/64x384', asked 'edje-tokens/v1/int8/64x384'",
                          "pick another --collection")
    res = cli("ingest", str(demo_folder), "--store", str(filled), "--model", str(other_model_dir))
    # same model name, other weights: a new version of the model -> re-ingest
    assert_one_line_error(res, "was built with another version of model 'tiny-random'", "fingerprint: recorded",
                          "Re-ingest your images with the current model")
    res = cli("search", "a dog", "--store", str(filled), "--model", str(other_model_dir))
    assert_one_line_error(res, "built with another version of model tiny-random", "re-ingest")
    assert count(filled) == before
    ok = cli("search", "a dog", "--store", str(filled), "-k", "2", "--json")  # its own model still works
    assert ok.exit_code == 0 and len(json.loads(ok.output)) == 2
