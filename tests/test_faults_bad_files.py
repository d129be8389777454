"""The bad-file matrix: one folder holding every kind of awkward entry, ingested in one run.

Each entry is either ingested correctly (checked through its stored payload) or skipped with its reason in the
errors file; the run never aborts and never hangs (it runs under a deadline, with a per-file time limit).
As root, file modes do not stop reads, so the ingest thread drops root's DAC override capability for the
"unreadable" case to mean something.
"""
from __future__ import annotations

import ctypes
import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

import imagegen as g
from edje_qdrant.ingestion import ingest
from edje_qdrant.store import open_store

RUN_DEADLINE = 240.0  # seconds for the whole run; the per-file limit below keeps any one file from hanging it
FILE_TIMEOUT = 30.0


def drop_dac_override() -> bool:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the calling thread's effective capabilities.

    Root then obeys file modes (as the owner: 0700 folders stay usable, a mode-000 file is refused). Threads
    started afterwards from this thread inherit it, so the ingest workers do too. False when not possible.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3, this thread
        if libc.capget(ctypes.byref(header), data) != 0:
            return False
        data[0].effective &= ~((1 << 1) | (1 << 2))
        return libc.capset(ctypes.byref(header), data) == 0
    except (OSError, AttributeError):
        return False


def make_png_bomb(path: Path, side: int = 10_000) -> Path:
    """A complete, valid 1-bit PNG of side x side pixels (100 MP decoded, over the 80 MP cap) in ~15 KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def _save(im: Image.Image, fmt: str, **kw: Any) -> Callable[[Path], Any]:
    return lambda p: im.save(p, fmt, **kw)


def _corrupt_exif(p: Path) -> None:
    g.pattern((40, 30), seed=4).save(p, "JPEG", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\xff\xff\xff\xffgarbage")


def _trailing_garbage(p: Path) -> None:
    g.make_image(p, "JPEG", seed=41)
    with open(p, "ab") as fh:
        fh.write(b"\x00garbage after the end-of-image marker" * 20)


def _heic(p: Path) -> None:
    if g.heif_supported() is None:
        g.make_heic(p, seed=42)
    else:  # no encoder here: the row is reported as skipped by the test
        p.write_bytes(b"")


# name -> (how to make it, expected outcome). Outcome: ("ingested", {metadata field: value}) or ("skipped", kind).
CASES: dict[str, tuple[Callable[[Path], Any], tuple[str, Any]]] = {
    "zero-bytes.jpg": (lambda p: p.write_bytes(b""), ("skipped", "empty")),
    "truncated.jpg": (lambda p: g.make_truncated(p, "JPEG", keep=0.3), ("skipped", "truncated")),
    "truncated.png": (lambda p: g.make_truncated(p, "PNG"), ("skipped", "truncated")),
    "png-named.jpg": (lambda p: g.make_image(p, "PNG", seed=31), ("ingested", {"mime": "image/png"})),
    "jpeg-named.png": (lambda p: g.make_image(p, "JPEG", seed=32), ("ingested", {"mime": "image/jpeg"})),
    "text-named.jpg": (g.make_text_as_image, ("skipped", "not_image")),
    "random-bytes.webp": (lambda p: p.write_bytes(os.urandom(3000)), ("skipped", "not_image")),
    "bad-crc.png": (g.make_bad_header, ("skipped", "not_image")),
    "bomb-100mp.png": (make_png_bomb, ("skipped", "too_large")),
    "huge-header-100kx100k.png": (g.make_png_header_bomb, ("skipped", "too_large")),
    "huge-12000x4000.jpg": (_save(Image.new("L", (12000, 4000), 128), "JPEG", quality=50),
                            ("ingested", {"width": 12000, "height": 4000})),  # 48 MP, under the cap: drafted
    "one-by-one.png": (lambda p: g.make_image(p, "PNG", size=(1, 1), seed=33),
                       ("ingested", {"width": 1, "height": 1})),
    "wide-4000x1.png": (lambda p: g.make_image(p, "PNG", size=(4000, 1), seed=34),
                        ("ingested", {"width": 4000, "height": 1})),
    "gray-16bit.png": (lambda p: g.make_16bit_png(p, value=30000), ("ingested", {"mime": "image/png"})),
    "cmyk.jpg": (g.make_cmyk_jpeg, ("ingested", {"mime": "image/jpeg"})),
    "palette-transparent.png": (g.make_palette_transparent_png, ("ingested", {"mime": "image/png"})),
    "animated.gif": (g.make_animated_gif, ("ingested", {"mime": "image/gif", "width": 32})),
    "corrupt-exif.jpg": (_corrupt_exif, ("ingested", {"width": 40, "height": 30})),
    "photo.heic": (_heic, ("ingested", {"mime": ("image/heic", "image/heif")})),
    "UPPER.JPG": (lambda p: g.make_image(p, "JPEG", seed=35), ("ingested", {"mime": "image/jpeg"})),
    "trailing-garbage.jpg": (_trailing_garbage, ("ingested", {"width": 64, "height": 48})),
    "cmyk-progressive.jpg": (_save(Image.new("CMYK", (24, 24), (0, 0, 255, 0)), "JPEG", progressive=True),
                             ("ingested", {"width": 24})),
}
# Entries that need the file system rather than a file's bytes (made in build()).
SPECIAL = {
    "unreadable.png": ("skipped", "unreadable"),  # mode 000
    "broken-link.jpg": ("skipped", "walk"),
    "link-loop.jpg": ("skipped", "walk"),
    "fifo.jpg": ("skipped", "walk"),
    "deleted-after-listing.png": ("skipped", "vanished"),
    "na\\xefve-\\xff.png": ("ingested", {}),  # non-UTF-8 name, stored in its backslash-escaped form
    "album.jpg/inside.png": ("ingested", {"folder": "album.jpg"}),  # a directory named like an image
    "loop/back -> root": ("walked once", None),  # a folder link back to the root: no error, no second visit
}


def build(root: Path) -> None:
    root.mkdir()
    for name, (make, _) in CASES.items():
        make(root / name)
    g.make_image(root / "unreadable.png", "PNG", seed=36)
    (root / "broken-link.jpg").symlink_to(root / "gone.jpg")
    (root / "link-loop.jpg").symlink_to("link-loop.jpg")
    os.mkfifo(root / "fifo.jpg")
    g.make_image(root / "deleted-after-listing.png", "PNG", seed=37)
    g.make_image(Path(os.fsdecode(os.fsencode(root) + b"/na\xefve-\xff.png")), "PNG", seed=38)
    g.make_image(root / "album.jpg" / "inside.png", "PNG", seed=39)
    (root / "loop").mkdir()
    (root / "loop" / "back").symlink_to(root)
    os.chmod(root / "unreadable.png", 0)


class DeleteBeforeDecode:
    """The real store; deletes one file after the walk listed and hashed it, before it is decoded."""

    def __init__(self, inner: Any, victim: Path) -> None:
        self._inner, self._victim = inner, victim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def existing_ids(self, name: str, ids: Any) -> set[str]:
        if self._victim.exists():
            self._victim.unlink()
        return self._inner.existing_ids(name, ids)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF", "ignore::PIL.Image.DecompressionBombWarning")
def test_bad_file_matrix(tmp_path, tiny_model, record_property):
    model = tiny_model
    root = tmp_path / "imgs"
    build(root)
    heic_ok = g.heif_supported() is None
    errors_file = tmp_path / "errors.jsonl"
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            # As root, file modes do not apply: drop that privilege in this thread (the ingest threads inherit it).
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                drop_dac_override()
            try:
                with open(root / "unreadable.png", "rb"):
                    outcome["mode_000_readable"] = True
            except PermissionError:
                outcome["mode_000_readable"] = False
            store = open_store(path=str(tmp_path / "store"))
            try:
                victim = root / "deleted-after-listing.png"
                outcome["report"] = ingest(root, DeleteBeforeDecode(store, victim), model, errors_file=errors_file,
                                           batch_size=64, file_timeout=FILE_TIMEOUT)
                outcome["hits"] = store.query("images", [1.0] * model.clip_dim, 100, ["metadata"])
            finally:
                store.close()
        except BaseException as exc:  # noqa: BLE001 - an abort is a failure, reported below
            outcome["error"] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(RUN_DEADLINE)
    assert not worker.is_alive(), f"ingest hung for more than {RUN_DEADLINE:.0f} s"
    elapsed = time.monotonic() - t0
    assert "error" not in outcome, f"the run aborted: {outcome.get('error')!r}"
    report, hits = outcome["report"], outcome["hits"]
    stored = {h.payload["metadata"]["source"][len(str(root)) + 1:]: h.payload["metadata"] for h in hits}
    failed = {e["path"][len(str(root)) + 1:]: e for e in map(json.loads, errors_file.read_text().splitlines())}

    expected = {name: want for name, (_, want) in CASES.items()}
    expected.update({k: v for k, v in SPECIAL.items() if v[1] is not None})
    if not heic_ok:
        expected["photo.heic"] = ("skipped", "empty")
    if outcome["mode_000_readable"]:  # could not drop root's override here: the file is simply read
        expected["unreadable.png"] = ("ingested", {})
    matrix: dict[str, str] = {}
    for name, (status, detail) in expected.items():
        if status == "ingested":
            assert name in stored, f"{name}: expected to be ingested; errors: {failed.get(name)}"
            meta = stored[name]
            for field, value in detail.items():
                assert meta[field] in (value if isinstance(value, tuple) else (value,)), (name, field, meta[field])
            assert meta["width"] >= 1 and meta["height"] >= 1 and len(meta["sha256"]) == 64
            matrix[name] = f"ingested ({meta['mime']}, {meta['width']}x{meta['height']})"
        else:
            assert name in failed, f"{name}: expected to be skipped as {detail}; stored: {name in stored}"
            rec = failed[name]
            assert rec["kind"] == detail and rec["reason"] and rec["error_type"], (name, rec)
            matrix[name] = f"skipped [{rec['kind']}] {rec['reason']}"
    matrix["loop/back -> root"] = "walked once (no error, no second visit)"
    assert not any(name.startswith("loop/") for name in stored)  # the folder link back to the root is not re-entered
    assert set(stored) == {n for n, (s, _) in expected.items() if s == "ingested"}
    assert set(failed) == {n for n, (s, _) in expected.items() if s == "skipped"}
    assert report.ingested == len(stored) and report.failed == len(failed) and not report.interrupted
    assert len(matrix) >= 20 and elapsed < RUN_DEADLINE

    lines = [f"{name:28s} {result}" for name, result in matrix.items()]
    record_property("bad_file_matrix", json.dumps(matrix))
    print("\nbad-file matrix:\n" + "\n".join(lines) + f"\n({len(matrix)} cases, {elapsed:.1f} s)")
