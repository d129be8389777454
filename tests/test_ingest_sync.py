"""Ingest keeps the collection equal to the folder: deleted, changed, moved files, copies, two roots, --no-prune,
empty/missing roots, files that cannot be read. Real stores (Qdrant Edge on disk, qdrant-client local mode)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import imagegen as g
from edje_qdrant.schema import TOKENS_KEY
from edje_qdrant.errors import InputError
from edje_qdrant.ingestion import ingest, point_id
from edje_qdrant.ingestion.sync import Unreadable, relocate, under
from edje_qdrant.store import open_store


@pytest.fixture(params=["edge", "memory"])
def store(request, tmp_path):
    s = open_store(path=str(tmp_path / "store")) if request.param == "edge" else open_store(url=":memory:")
    yield s
    s.close()


def pid_of(path: Path) -> str:
    return point_id(hashlib.sha256(path.read_bytes()).hexdigest())


def stored(store, collection: str = "images") -> dict[str, dict]:
    """point id -> metadata of every stored point."""
    return {h.id: h.payload["metadata"] for h in store.scroll(collection, ["metadata"])}


def sources(store, collection: str = "images") -> set[str]:
    return {m["source"] for m in stored(store, collection).values()}


def make_folder(root: Path, n: int = 5, seed: int = 0) -> list[Path]:
    return [g.make_image(root / f"{i:02d}.png", "PNG", seed=seed + i) for i in range(n)]


def test_deleted_files_are_removed(tmp_path, store, tiny_model):
    root = tmp_path / "imgs"
    files = make_folder(root)
    assert ingest(root, store, tiny_model).ingested == 5
    gone = [files[1], files[3]]
    gone_ids = {pid_of(p) for p in gone}
    for p in gone:
        p.unlink()
    report = ingest(root, store, tiny_model)
    assert (report.ingested, report.skipped_existing, report.removed, report.moved) == (0, 3, 2, 0)
    assert report.prune_skipped is None
    assert store.count("images") == 3 and store.existing_ids("images", gone_ids) == set()
    assert sources(store) == {str(p) for p in files if p not in gone}
    again = ingest(root, store, tiny_model)  # a second sync has nothing to do
    assert (again.removed, again.moved, again.skipped_existing) == (0, 0, 3)


def test_changed_file_replaces_its_old_point(tmp_path, store, tiny_model):
    root = tmp_path / "imgs"
    p, other = make_folder(root, 2)
    ingest(root, store, tiny_model)
    old_id = pid_of(p)
    g.make_image(p, "PNG", seed=99)  # same path, new content
    report = ingest(root, store, tiny_model)
    assert (report.ingested, report.skipped_existing, report.removed) == (1, 1, 1)
    assert store.count("images") == 2 and store.existing_ids("images", [old_id]) == set()
    meta = stored(store)[pid_of(p)]
    assert meta["source"] == str(p) and meta["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


def test_moved_and_renamed_files_keep_their_point_without_re_encoding(tmp_path, store, tiny_model):
    root = tmp_path / "imgs"
    a, b, c = make_folder(root, 3)
    (root / "00.png.txt").write_text("a caption for the first")
    ingest(root, store, tiny_model)
    before = {h.id: h.payload[TOKENS_KEY] for h in store.scroll("images", [TOKENS_KEY])}
    renamed = root / "renamed.png"
    a.rename(renamed)  # its caption sidecar is left behind: the new name becomes the text
    (root / "trips" / "oslo").mkdir(parents=True)
    moved = root / "trips" / "oslo" / "b.png"
    b.rename(moved)
    # max_pixels=1 fails every image that gets decoded: a move must not decode (re-encode) anything
    report = ingest(root, store, tiny_model, max_pixels=1)
    assert (report.ingested, report.failed, report.removed, report.moved) == (0, 0, 0, 2)
    assert store.count("images") == 3
    meta = stored(store)
    assert meta[pid_of(renamed)]["source"] == str(renamed) and meta[pid_of(renamed)]["folder"] == ""
    assert meta[pid_of(moved)]["source"] == str(moved) and meta[pid_of(moved)]["folder"] == "trips/oslo"
    assert meta[pid_of(moved)]["locations"] == [{"source": str(moved), "folder": "trips/oslo"}]
    (hit,) = store.retrieve("images", [pid_of(renamed)], ["page_content"])
    assert hit.payload["page_content"] == "renamed.png"
    after = {h.id: h.payload[TOKENS_KEY] for h in store.scroll("images", [TOKENS_KEY])}
    assert after == before  # same points, same token blobs
    # the filter on folder follows the move
    hits = store.query("images", [1.0] * tiny_model.clip_dim, 10, ["metadata"], filter={"folder": "trips/oslo"})
    assert [h.id for h in hits] == [pid_of(moved)]


def test_same_content_in_two_files_is_one_point_until_both_are_gone(tmp_path, store, tiny_model):
    root = tmp_path / "imgs"
    first = g.make_image(root / "a" / "x.png", "PNG", seed=5)
    (root / "b").mkdir()
    copy = root / "b" / "copy.png"
    shutil.copy(first, copy)
    report = ingest(root, store, tiny_model)
    assert (report.ingested, report.duplicates) == (1, 1) and store.count("images") == 1
    meta = stored(store)[pid_of(first)]
    assert meta["source"] == str(first)
    assert [x["source"] for x in meta["locations"]] == [str(first), str(copy)]
    first.unlink()  # the copy still holds the picture: the point stays, now named by the copy
    report = ingest(root, store, tiny_model)
    assert (report.removed, report.moved) == (0, 1)
    meta = stored(store)[pid_of(copy)]
    assert meta["source"] == str(copy) and meta["folder"] == "b"
    assert [x["source"] for x in meta["locations"]] == [str(copy)]
    g.make_image(root / "c.png", "PNG", seed=6)
    copy.unlink()
    report = ingest(root, store, tiny_model)
    assert (report.ingested, report.removed) == (1, 1) and store.count("images") == 1


def test_only_points_under_the_ingested_root_are_pruned(tmp_path, store, tiny_model):
    root_a, root_b = tmp_path / "a", tmp_path / "ab"  # "ab" starts like "a": components, not characters
    a_files = make_folder(root_a, 3, seed=0)
    b_files = make_folder(root_b, 3, seed=10)
    shared_b = root_b / "shared.png"
    shutil.copy(a_files[0], shared_b)  # one picture in both folders
    ingest(root_a, store, tiny_model)
    report = ingest(root_b, store, tiny_model)
    assert (report.ingested, report.skipped_existing, report.removed) == (3, 1, 0)
    assert store.count("images") == 6
    meta = stored(store)[pid_of(shared_b)]
    assert meta["source"] == str(a_files[0])  # the first folder keeps naming it
    assert [x["source"] for x in meta["locations"]] == [str(a_files[0]), str(shared_b)]

    a_files[0].unlink()
    a_files[1].unlink()
    report = ingest(root_a, store, tiny_model)
    assert (report.removed, report.moved) == (1, 1)  # 01.png is gone; 00.png lives on in the other folder
    assert store.count("images") == 5
    assert stored(store)[pid_of(shared_b)]["source"] == str(shared_b)
    assert {str(p) for p in b_files} <= sources(store)


def test_no_prune_keeps_everything(tmp_path, store, tiny_model):
    root = tmp_path / "imgs"
    files = make_folder(root, 4)
    ingest(root, store, tiny_model)
    old = {pid_of(p) for p in files}
    files[0].unlink()
    g.make_image(files[1], "PNG", seed=50)  # changed
    files[2].rename(root / "renamed.png")
    report = ingest(root, store, tiny_model, prune=False)
    assert (report.ingested, report.removed, report.moved) == (1, 0, 1)
    assert report.prune_skipped == "prune is off"
    assert store.count("images") == 5 and store.existing_ids("images", old) == old
    assert str(root / "renamed.png") in sources(store)
    report = ingest(root, store, tiny_model)  # pruning again catches up
    assert report.removed == 2 and store.count("images") == 3


def test_empty_or_missing_root_removes_nothing(tmp_path, store, tiny_model):
    root = tmp_path / "imgs"
    make_folder(root, 3)
    (root / "notes.txt").write_text("not an image")
    ingest(root, store, tiny_model)
    for p in root.glob("*.png"):
        p.unlink()
    report = ingest(root, store, tiny_model)  # e.g. an unmounted disk: the folder is there, but empty
    assert report.seen == 0 and report.removed == 0 and report.prune_skipped == "no images found"
    assert store.count("images") == 3
    shutil.rmtree(root)
    with pytest.raises(InputError, match="does not exist"):
        ingest(root, store, tiny_model)
    assert store.count("images") == 3


def test_unreadable_files_keep_their_points(tmp_path, store, tiny_model):
    root = tmp_path / "imgs"
    files = make_folder(root, 4)
    ingest(root, store, tiny_model)
    g.make_truncated(files[0])  # being rewritten: cannot be decoded now
    files[1].unlink()
    files[1].symlink_to(tmp_path / "nowhere.png")  # a broken link where the photo was: a walk error
    report = ingest(root, store, tiny_model)
    assert report.failed == 2 and report.removed == 0 and report.skipped_existing == 2
    assert store.count("images") == 4
    for p in files[2:]:
        p.unlink()
    report = ingest(root, store, tiny_model)  # the two deleted ones go, the two unreadable ones stay
    assert report.failed == 2 and report.removed == 2 and store.count("images") == 2
    files[0].unlink()
    files[0].symlink_to(tmp_path / "nowhere-either.png")
    report = ingest(root, store, tiny_model)  # no content could be read at all: nothing is removed
    assert report.failed == 2 and report.removed == 0 and report.prune_skipped == "no image could be read"
    assert store.count("images") == 2


def test_relocate_rules():
    loc = lambda p, f="": {"source": p, "folder": f}  # noqa: E731
    none = Unreadable()
    assert under("/a/b/c.png", "/a/b") and under("/a/b/c.png", "/a/b/") and not under("/a/bc.png", "/a/b")
    assert relocate([loc("/r/x.png")], [], "/r", none, prune=True) == []
    assert relocate([loc("/r/x.png")], [], "/r", none, prune=False) == [loc("/r/x.png")]
    assert relocate([loc("/other/x.png")], [], "/r", none, prune=True) == [loc("/other/x.png")]
    assert relocate([loc("/r/x.png")], [], "/r", Unreadable(files={"/r/x.png"}), prune=True) == [loc("/r/x.png")]
    assert relocate([loc("/r/s/x.png")], [], "/r", Unreadable(folders=["/r/s"]), prune=True) == [loc("/r/s/x.png")]
    assert relocate([loc("/r/x.png")], [loc("/r/y.png")], "/r", none, prune=True) == [loc("/r/y.png")]
    # without pruning the old path stays listed, but the point is named by the path that holds it
    assert relocate([loc("/r/x.png")], [loc("/r/y.png")], "/r", none, prune=False) == [loc("/r/y.png"),
                                                                                         loc("/r/x.png")]
    assert relocate([], [], "/r", none, prune=True) == []  # a point with no path: never touched by the caller


def test_cli_summary_names_every_count_and_an_empty_folder(tmp_path):
    from click.testing import CliRunner

    from edje_qdrant.cli.main import main

    def cli(*args: str):
        return CliRunner().invoke(main, ["ingest", *args, "--store", str(tmp_path / "store"), "--model",
                                         "tiny-random"])

    root = tmp_path / "imgs"
    files = make_folder(root, 4)
    shutil.copy(files[0], root / "copy.png")
    res = cli(str(root), "--progress")  # bars on a non-terminal stderr only when asked for
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("ingested 4, skipped-existing 0, duplicates 1, failed 0, removed 0, moved 0 in ")
    assert "images/s" in res.stdout and "4/5" not in res.stderr and "5/5" in res.stderr  # progress with its total
    files[1].unlink()
    files[2].rename(root / "renamed.png")
    res = cli(str(root), "--no-prune", "--json")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert {k: summary[k] for k in ("ingested", "skipped_existing", "duplicates", "failed", "removed", "moved")} \
        == {"ingested": 0, "skipped_existing": 3, "duplicates": 1, "failed": 0, "removed": 0, "moved": 1}
    assert summary["prune_skipped"] == "prune is off"
    res = cli(str(root))
    assert "skipped-existing 3, duplicates 1, failed 0, removed 1, moved 0" in res.stdout
    (tmp_path / "empty").mkdir()
    res = cli(str(tmp_path / "empty"))
    assert res.exit_code == 0
    assert f"no images found under {tmp_path / 'empty'}" in res.stderr
    assert res.stdout.startswith("ingested 0, skipped-existing 0, duplicates 0, failed 0, removed 0")
    res = cli(str(root), "--json")
    assert json.loads(res.stdout)["skipped_existing"] == 3  # the empty folder removed nothing
