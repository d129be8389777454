"""The folder walk: order, links, loops, odd names and entries."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from edje_qdrant.ingestion.walk import WalkError, WalkItem, display_path, is_image_name, walk_images


def touch(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def rels(root: Path, events) -> list[str]:
    return [os.path.relpath(e.path, root) for e in events if isinstance(e, WalkItem)]


def test_sorted_recursive_and_only_image_extensions(tmp_path):
    for rel in ["b.jpg", "a.PNG", "z/c.webp", "z/y/d.gif", "m.bmp", "n.TIFF", "o.heic", "p.avif", "q.jpeg",
                "notes.txt", "a.PNG.txt", ".DS_Store", "raw.cr2"]:
        touch(tmp_path / rel)
    events = list(walk_images(tmp_path))
    assert not [e for e in events if isinstance(e, WalkError)]
    assert rels(tmp_path, events) == ["a.PNG", "b.jpg", "m.bmp", "n.TIFF", "o.heic", "p.avif", "q.jpeg",
                                      "z/c.webp", "z/y/d.gif"]
    folders = {os.path.relpath(e.path, tmp_path): e.folder for e in events}
    assert folders["b.jpg"] == "" and folders["z/c.webp"] == "z" and folders["z/y/d.gif"] == "z/y"
    assert list(walk_images(tmp_path)) == events  # deterministic


def test_directory_named_like_an_image_is_walked_not_read(tmp_path):
    touch(tmp_path / "album.jpg" / "inside.png")
    events = list(walk_images(tmp_path))
    assert rels(tmp_path, events) == ["album.jpg/inside.png"]
    assert not [e for e in events if isinstance(e, WalkError)]


def test_broken_symlink_reported_and_symlink_loops_survived(tmp_path):
    touch(tmp_path / "real" / "a.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")  # not image-named: ignored
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")  # ELOOP
    (tmp_path / "real" / "up").symlink_to(tmp_path)  # dir loop back to the root
    (tmp_path / "real" / "again").symlink_to(tmp_path / "real")  # loop to itself
    (tmp_path / "alias").symlink_to(tmp_path / "real")  # a second way into real/
    events = list(walk_images(tmp_path))
    assert rels(tmp_path, events) == ["alias/a.jpg"]  # real/ entered once, first in byte order via alias
    errors = {os.path.relpath(e.path, tmp_path): e.reason for e in events if isinstance(e, WalkError)}
    assert set(errors) == {"dangling.jpg", "self.png"}
    assert "broken symbolic link" in errors["dangling.jpg"]
    assert "loop" in errors["self.png"]


def test_file_symlink_is_followed(tmp_path):
    touch(tmp_path / "store" / "x.bin", b"data")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "store" / "x.bin")
    assert rels(tmp_path, walk_images(tmp_path)) == ["link.jpg"]


def test_fifo_with_image_name_is_reported_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    events = list(walk_images(tmp_path))
    assert [type(e) for e in events] == [WalkError]
    assert "not a regular file" in events[0].reason


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses non-UTF-8 file names")
def test_non_utf8_file_name(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw, "wb") as fh:
        fh.write(b"x")
    (item,) = list(walk_images(tmp_path))
    assert isinstance(item, WalkItem)
    assert os.fsencode(item.path) == raw  # the real name, openable
    shown = display_path(item.path)
    shown.encode("utf-8")  # valid text for payloads / JSON
    assert shown.endswith("caf\\xe9.jpg")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads unreadable folders")
def test_unreadable_folder_reported_and_walk_continues(tmp_path):
    touch(tmp_path / "locked" / "a.jpg")
    touch(tmp_path / "open" / "b.jpg")
    os.chmod(tmp_path / "locked", 0)
    try:
        events = list(walk_images(tmp_path))
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert rels(tmp_path, events) == ["open/b.jpg"]
    assert [os.path.relpath(e.path, tmp_path) for e in events if isinstance(e, WalkError)] == ["locked"]


def test_missing_root_is_an_error_event(tmp_path):
    (event,) = list(walk_images(tmp_path / "missing"))
    assert isinstance(event, WalkError)


def test_is_image_name():
    assert is_image_name("X.JPG") and is_image_name("a.b.heif") and is_image_name("p.tif")
    assert not is_image_name("jpg") and not is_image_name("a.jpg.txt") and not is_image_name("a.svg")
