"""Search by image ("more like this") on real stores with the tiny-random model, and through the CLI."""
from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner
from PIL import Image

import imagegen as g
from edje_qdrant.cli.main import main
from edje_qdrant.errors import InputError
from edje_qdrant.ingestion import ingest
from edje_qdrant.retriever import Retriever
from edje_qdrant.store import open_store

from test_ingest_sync import pid_of


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Eight distinct pictures, plus a near copy of the first (re-encoded as JPEG, slightly smaller)."""
    root = tmp_path_factory.mktemp("photos")
    files = [g.make_image(root / f"p{i}.png", "PNG", size=(96, 72), seed=200 + 17 * i) for i in range(8)]
    with Image.open(files[0]) as im:
        im.resize((90, 68)).save(root / "near-copy.jpg", "JPEG", quality=85)
    return root, files


@pytest.fixture(params=["edge", "memory"])
def retriever(request, tmp_path, photos, tiny_model):
    root, _ = photos
    store = open_store(path=str(tmp_path / "store")) if request.param == "edge" else open_store(url=":memory:")
    assert ingest(root, store, tiny_model).ingested == 9
    r = Retriever(store, "images", tiny_model)
    yield r
    r.close()


def test_the_photo_itself_is_left_out_and_a_near_copy_ranks_first(retriever, photos):
    root, files = photos
    results = retriever.search_image(files[0], k=5)
    assert len(results) == 5
    assert pid_of(files[0]) not in [r.id for r in results]  # the query photo is in the store: left out
    assert results[0].path == str(root / "near-copy.jpg")
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(r.rerank_score is None and r.score == r.first_stage_score for r in results)
    with_self = retriever.search_image(str(files[0]), k=5, exclude_self=False)
    assert with_self[0].id == pid_of(files[0]) and with_self[0].score == pytest.approx(1.0, abs=1e-4)
    assert [r.id for r in with_self[1:]] == [r.id for r in results[:4]]


def test_bytes_and_pil_inputs(retriever, photos):
    _, files = photos
    by_bytes = retriever.search_image(files[3].read_bytes(), k=3)
    assert pid_of(files[3]) not in [r.id for r in by_bytes]
    with Image.open(files[3]) as im:  # no bytes to know it by: the photo itself comes first
        by_pil = retriever.search_image(im.convert("RGBA"), k=3)
    assert by_pil[0].id == pid_of(files[3]) and by_pil[0].score == pytest.approx(1.0, abs=1e-3)
    assert [r.id for r in by_pil[1:]] == [r.id for r in by_bytes[:2]]


def test_filter_applies(retriever, photos):
    root, files = photos
    hits = retriever.search_image(files[1], k=9, filter={"mime": "image/jpeg"})
    assert [h.path for h in hits] == [str(root / "near-copy.jpg")]


def test_bad_image_inputs_are_clear_errors(retriever, tmp_path):
    with pytest.raises(InputError, match=r"query image .*missing\.jpg: no such file"):
        retriever.search_image(tmp_path / "missing.jpg")
    fake = g.make_text_as_image(tmp_path / "notes.jpg")
    with pytest.raises(InputError, match=r"query image .*notes\.jpg: not a readable image"):
        retriever.search_image(fake)
    with pytest.raises(InputError, match="not a regular file"):
        retriever.search_image(tmp_path)
    with pytest.raises(InputError, match="bytes: empty file"):
        retriever.search_image(b"")
    with pytest.raises(InputError, match="path, bytes or a PIL image"):
        retriever.search_image(3.5)
    with pytest.raises(InputError, match="k must be"):
        retriever.search_image(io.BytesIO(b"x").getvalue(), k=0)


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_cli_search_by_image_and_empty_results(tmp_path, photos):
    root, files = photos
    store = tmp_path / "store"
    assert _cli("ingest", str(root), "--store", str(store), "--model", "tiny-random", "--json").exit_code == 0
    res = _cli("search", "--image", str(files[0]), "--store", str(store), "-k", "3")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].endswith("near-copy.jpg")
    assert str(files[0]) not in res.stdout
    res = _cli("search", "--image", str(files[0]), "--store", str(store), "--json", "-k", "2")
    hits = json.loads(res.stdout)
    assert len(hits) == 2 and hits[0]["rerank_score"] is None
    # a search that matches nothing says so on stderr, exits 0, and prints no result lines
    res = _cli("search", "a dog", "--store", str(store), "--where", "folder=nowhere")
    assert res.exit_code == 0 and res.stdout == "" and "no results" in res.stderr
    res = _cli("search", "--image", str(files[0]), "--store", str(store), "--where", "folder=nowhere", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout) == [] and "no results" in res.stderr


def test_cli_search_needs_exactly_one_of_text_or_image(tmp_path, photos):
    _, files = photos
    for args in (["search", "x", "--image", str(files[0])], ["search"]):
        res = _cli(*args, "--store", str(tmp_path / "s"))
        assert res.exit_code == 1 and "either QUERY text or --image PHOTO" in res.output
    res = _cli("search", "--image", str(tmp_path / "gone.jpg"), "--store", str(tmp_path / "s"))
    assert res.exit_code == 1 and "gone.jpg: no such file" in res.output and "Traceback" not in res.output
