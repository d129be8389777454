"""The service's image routes over plain HTTP (ASGI test client, real Retriever, Qdrant Edge store, tiny-random
model, real image files): thumbnails and originals by point id only, "more like this", search by an uploaded
photo, path-traversal attempts, upload limits and the auth matrix."""
from __future__ import annotations

import hashlib
import io
import time

import pytest

pytest.importorskip("fastapi", reason="optional extra: pip install 'edje-qdrant[service]'")
pytest.importorskip("httpx", reason="the ASGI test client needs httpx")
pytest.importorskip("multipart", reason="uploads need python-multipart (service extra)")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import imagegen as g  # noqa: E402
from edje_qdrant.ingestion import ingest  # noqa: E402
from edje_qdrant.retriever import Retriever  # noqa: E402
from edje_qdrant.schema import point_id, point_payload  # noqa: E402
from edje_qdrant.service import ServiceLimits, create_app  # noqa: E402
from edje_qdrant.service_auth import Access  # noqa: E402
from edje_qdrant.store import open_store  # noqa: E402
from edje_qdrant.store.base import PointRecord  # noqa: E402
from live_server import raw_get, serving  # noqa: E402

LIMITS = ServiceLimits(max_k=20, max_rerank_k=50, max_query_chars=200, max_upload_bytes=200_000)
KEY = "svc-key-2718281828"
SECRET = b"TOP-SECRET-MARKER-31415"


def pid_of(path) -> str:
    return point_id(hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A store with collection 'images' (photos/) and collection 'other' (elsewhere/), a secret file beside
    them, and a picture in photos/ that was never ingested."""
    root = tmp_path_factory.mktemp("images-world")
    photos = root / "photos"
    files = [g.make_image(photos / f"p{i}.png", "PNG", size=(96, 72), seed=300 + 11 * i) for i in range(6)]
    files.append(g.make_image(photos / "trips" / "t0.jpg", "JPEG", size=(120, 80), seed=400))
    # EXIF orientation 6 (rotate 90° clockwise on display): stored 80x40, seen as 40x80
    files.append(g.make_image(photos / "rotated.jpg", "JPEG", size=(80, 40), seed=500,
                              exif=g.make_exif(orientation=6).tobytes()))
    elsewhere = [g.make_image(root / "elsewhere" / f"e{i}.png", "PNG", size=(64, 48), seed=600 + i) for i in range(3)]
    store = open_store(path=str(root / "store"))
    assert ingest(photos, store, tiny_model, "images").ingested == len(files)
    assert ingest(root / "elsewhere", store, tiny_model, "other").ingested == 3
    (root / "secret.txt").write_bytes(SECRET)
    later = g.make_image(photos / "added-after-ingest.png", "PNG", size=(64, 48), seed=700)
    retriever = Retriever(store, "images", tiny_model)
    yield {"root": root, "photos": photos, "files": files, "elsewhere": elsewhere, "later": later,
           "store": store, "retriever": retriever}
    store.close()


@pytest.fixture()
def client(world):
    with TestClient(create_app(world["retriever"], limits=LIMITS)) as c:
        yield c


@pytest.fixture()
def locked(world):
    with TestClient(create_app(world["retriever"], limits=LIMITS, api_keys=[KEY])) as c:
        yield c


def _outside_bytes(world) -> list[bytes]:
    """Content that must never come back: the secret file, files of the other collection, a file never ingested,
    and the system's password file."""
    out = [SECRET, world["later"].read_bytes()] + [p.read_bytes() for p in world["elsewhere"]]
    try:
        out.append(open("/etc/passwd", "rb").read()[:64])
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------- thumbnails and originals


def test_thumbnail_is_a_jpeg_that_fits_with_exif_orientation_applied(client, world):
    by_name = {p.name: p for p in world["files"]}
    res = client.get(f"/points/{pid_of(by_name['p0.png'])}/thumbnail", params={"size": 48})
    assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(res.content)) as im:
        assert im.format == "JPEG" and im.size == (48, 36)
    res = client.get(f"/points/{pid_of(by_name['rotated.jpg'])}/thumbnail", params={"size": 64})
    with Image.open(io.BytesIO(res.content)) as im:
        assert im.size == (32, 64)  # portrait: the orientation tag was applied
    assert res.headers["x-content-type-options"] == "nosniff" and "private" in res.headers["cache-control"]
    again = client.get(f"/points/{pid_of(by_name['rotated.jpg'])}/thumbnail", params={"size": 64},
                       headers={"If-None-Match": res.headers["etag"]})
    assert again.status_code == 304 and not again.content


def test_original_is_the_ingested_file(client, world):
    photo = world["files"][-2]  # trips/t0.jpg
    res = client.get(f"/points/{pid_of(photo)}/image")
    assert res.status_code == 200 and res.content == photo.read_bytes()
    assert res.headers["content-type"] == "image/jpeg" and "t0.jpg" in res.headers["content-disposition"]
    assert "sandbox" in res.headers["content-security-policy"]


@pytest.mark.parametrize("size", [0, 31, 1025, -5])
def test_thumbnail_size_out_of_range_is_422(client, world, size):
    res = client.get(f"/points/{pid_of(world['files'][0])}/thumbnail", params={"size": size})
    assert res.status_code == 422


def test_unknown_ids_are_404(client, world):
    for raw in ("0b3a4c1e-0000-5000-8000-000000000000", pid_of(world["later"]), "not-a-uuid"):
        for route in ("thumbnail", "image", "similar"):
            res = client.get(f"/points/{raw}/{route}")
            assert res.status_code == 404, (raw, route, res.text)
            assert "no point" in res.json()["detail"]


def test_moved_or_changed_file_is_404_with_the_reason_and_decode_failure_is_422(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    a = g.make_image(folder / "a.png", "PNG", size=(64, 48), seed=1)
    b = g.make_image(folder / "b.png", "PNG", size=(64, 48), seed=2)
    store = open_store(path=str(tmp_path / "store"))
    ingest(folder, store, tiny_model, "images")
    # A point whose file hashes to its id but is not a picture (a collection written by another tool, or a file
    # format whose decoder is missing at serve time): real store, real file.
    fake = folder.parent / "not-a-picture.jpg"
    fake.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 10)
    fake_id = pid_of(fake)
    payload = point_payload("fake", {"source": str(fake), "folder": "", "mime": "image/jpeg"}, "", "x")
    store.upsert("images", [PointRecord(id=fake_id, vector=[1.0] * tiny_model.clip_dim, payload=payload)])
    with TestClient(create_app(Retriever(store, "images", tiny_model), limits=LIMITS)) as c:
        a_id, b_id = pid_of(a), pid_of(b)
        assert c.get(f"/points/{a_id}/thumbnail").status_code == 200  # now in the thumbnail cache
        moved = a.rename(folder / "a-moved.png")
        for route in ("thumbnail", "image"):
            res = c.get(f"/points/{a_id}/{route}")
            assert res.status_code == 404 and "moved or changed since ingest" in res.json()["detail"]
            assert "no such file" in res.json()["detail"] and "edje-qdrant ingest" in res.json()["detail"]
        moved.rename(a)
        assert c.get(f"/points/{a_id}/thumbnail").status_code == 200
        original = b.read_bytes()
        g.make_image(b, "PNG", size=(64, 48), seed=99)  # same path, other content
        res = c.get(f"/points/{b_id}/image")
        assert res.status_code == 404 and "changed since ingest" in res.json()["detail"]
        assert res.content.find(b.read_bytes()[:16]) < 0
        b.write_bytes(original)
        assert c.get(f"/points/{b_id}/image").content == original
        res = c.get(f"/points/{fake_id}/thumbnail")
        assert res.status_code == 422 and "does not decode" in res.json()["detail"]
    store.close()


# --------------------------------------------------------------------------- path traversal: 0 files outside served

TRAVERSALS = [
    "..", "../..", "../../etc/passwd", "..%2f..%2fetc%2fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "%2e%2e",
    "%252e%252e%252fetc%252fpasswd", "..%5c..%5cetc%5cpasswd", "....//....//etc/passwd", "%2fetc%2fpasswd",
    "/etc/passwd", "//etc/passwd", "~root", "secret.txt", "..%2fsecret.txt", "file:%2f%2f%2fetc%2fpasswd",
    "%00", "C:%5cWindows%5cwin.ini",
]


@pytest.fixture(scope="module")
def live(world):
    """The same two apps on real local ports (raw targets reach the router exactly as sent)."""
    with serving(create_app(world["retriever"], limits=LIMITS)) as open_url, \
            serving(create_app(world["retriever"], limits=LIMITS, api_keys=[KEY])) as locked_url:
        yield open_url, locked_url


@pytest.mark.parametrize("route", ["thumbnail", "image", "similar"])
def test_path_traversal_never_serves_a_file_outside_the_collection(live, world, route):
    """Every attempt, sent raw to a real server (no key, the key, and to a service without keys), is answered 4xx
    unless it names the collection's own point, and no response carries a byte of a file it does not name."""
    outside = _outside_bytes(world)
    root = world["root"]
    attempts = [f"/points/{t}/{route}" for t in TRAVERSALS]
    attempts += [f"/points/{pid_of(p)}/{route}" for p in world["elsewhere"]]  # ids of another collection
    attempts += [f"/points/{pid_of(world['later'])}/{route}"]  # a picture beside them, never ingested
    good = pid_of(world["files"][0])
    attempts += [f"/points/{good}/{route}?path=/etc/passwd", f"/points/{good}/{route}?source={root}/secret.txt",
                 f"/points/{good}/..%2f..%2f{route}", f"/points/{good}%2f..%2f..%2fsecret.txt/{route}",
                 f"/points/../../{root}/secret.txt", f"/points/{good}/{route}/../../../secret.txt",
                 f"/points/{good}/../../../../etc/passwd", f"/points/..%2f..%2f..{root}/secret.txt/{route}"]
    open_url, locked_url = live
    served = 0
    for base, headers in ((open_url, {}), (locked_url, {}), (locked_url, {"X-API-Key": KEY})):
        for target in attempts:
            status, body = raw_get(base, target, headers)
            assert not any(blob in body for blob in outside), target
            if status == 200:
                served += 1
                assert target.startswith(f"/points/{good}/{route}?"), target  # the collection's own point (the
                if route != "similar":  # unknown query parameter is ignored)
                    assert body.startswith((b"\xff\xd8", b"\x89PNG")), target
            else:
                assert status in (400, 401, 404, 405, 422), (target, status, body[:300])
    assert len(attempts) >= 30 and served == 4  # the two good-id URLs, without keys and with the key


# --------------------------------------------------------------------------- search results, similar, upload


def test_search_results_carry_image_urls_and_first_stage_ranks(client):
    res = client.post("/search", json={"query": "a photo", "k": 5, "rerank_k": 8})
    hits = res.json()["results"]
    assert len(hits) == 5
    ranks = [h["first_stage_rank"] for h in hits]
    assert len(set(ranks)) == 5 and all(1 <= r <= 8 for r in ranks)
    for hit in hits:
        assert hit["thumbnail_url"] == f"/points/{hit['id']}/thumbnail"
        assert client.get(hit["thumbnail_url"]).status_code == 200
        assert client.get(hit["image_url"]).content[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1")
    plain = client.post("/search", json={"query": "a photo", "k": 5, "rerank_k": 0}).json()["results"]
    assert [h["first_stage_rank"] for h in plain] == [1, 2, 3, 4, 5]


def test_similar_leaves_the_point_out_and_takes_filters(client, world):
    pid = pid_of(world["files"][0])
    res = client.get(f"/points/{pid}/similar", params={"k": 4})
    body = res.json()
    assert res.status_code == 200 and body["similar_to"] == pid and len(body["results"]) == 4
    assert pid not in [h["id"] for h in body["results"]]
    assert all(h["rerank_score"] is None for h in body["results"])
    assert [h["first_stage_rank"] for h in body["results"]] == [1, 2, 3, 4]
    assert body["results"] == sorted(body["results"], key=lambda h: -h["score"])
    only = client.get(f"/points/{pid}/similar", params={"k": 5, "folder": "trips"}).json()["results"]
    assert [h["path"].rsplit("/", 1)[-1] for h in only] == ["t0.jpg"]
    none = client.get(f"/points/{pid}/similar", params={"folder": "nowhere"}).json()["results"]
    assert none == []
    bad = client.get(f"/points/{pid}/similar", params={"taken_after": "last week"})
    assert bad.status_code == 422 and "taken_after" in bad.text


def test_upload_search_matches_the_library_and_leaves_the_photo_out(client, world):
    photo = world["files"][2]
    res = client.post("/search/image", files={"image": ("query.png", photo.read_bytes(), "image/png")},
                      data={"k": "3"})
    assert res.status_code == 200, res.text
    ids = [h["id"] for h in res.json()["results"]]
    assert ids == [r.id for r in world["retriever"].search_image(photo, k=3)]
    assert pid_of(photo) not in ids
    folder = client.post("/search/image", files={"image": ("q.png", photo.read_bytes(), "image/png")},
                         data={"k": "5", "folder": "trips"}).json()["results"]
    assert [h["metadata"]["folder"] for h in folder] == ["trips"]


def test_upload_limits(client, tmp_path):
    big = g.make_image(tmp_path / "big.png", "PNG", size=(400, 400), seed=3)  # noisy: ~480 kB > 200 kB cap
    assert big.stat().st_size > LIMITS.max_upload_bytes + 64 * 1024

    def post(data: bytes, name: str = "q.png") -> object:
        return client.post("/search/image", files={"image": (name, data, "image/png")})

    res = post(big.read_bytes())
    assert res.status_code == 413 and "limit" in res.json()["detail"]
    medium = g.make_image(tmp_path / "medium.png", "PNG", size=(320, 320), seed=3)  # over the photo cap only
    assert LIMITS.max_upload_bytes < medium.stat().st_size <= LIMITS.max_upload_bytes + 64 * 1024
    res = post(medium.read_bytes())
    assert res.status_code == 413 and f"{LIMITS.max_upload_bytes:,}" in res.json()["detail"]
    res = post(b"just some text, not a picture\n" * 20, "notes.txt")
    assert res.status_code == 415 and "not an image" in res.json()["detail"]
    pcx = io.BytesIO()
    g.pattern((32, 32)).save(pcx, "PCX")  # a format Pillow reads but ingest does not
    assert post(pcx.getvalue(), "x.pcx").status_code == 415
    assert post(b"", "empty.png").status_code == 422
    for size in ((100_000, 100_000), (9_000, 9_500)):  # above Pillow's own bomb guard, and above ours only
        bomb = g.make_png_header_bomb(tmp_path / "bomb.png", *size)
        res = post(bomb.read_bytes())
        assert res.status_code == 422 and "bomb" in res.json()["detail"], res.text
    truncated = g.make_truncated(tmp_path / "cut.jpg", "JPEG", size=(256, 256), keep=0.3)
    res = post(truncated.read_bytes(), "cut.jpg")
    assert res.status_code == 422, res.text
    assert client.post("/search/image", data={"k": "3"}).status_code == 422  # no file at all


# --------------------------------------------------------------------------- auth matrix


def test_auth_matrix(locked, world):
    pid, other = pid_of(world["files"][0]), pid_of(world["files"][1])
    good = Access([KEY])
    signed = good.url_params(pid)
    expired = Access([KEY], clock=lambda: time.time() - 3600).url_params(pid)
    too_far = Access([KEY], clock=lambda: time.time() + 86_400).url_params(pid)
    forged = Access(["another-key"]).url_params(pid)
    tampered = dict(signed, sig=signed["sig"][:-2] + ("AA" if not signed["sig"].endswith("AA") else "BB"))
    bearer, x_key, wrong = {"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}, {"Authorization": "Bearer nope"}
    photo = world["files"][0].read_bytes()
    cases = [  # (method, path, params, headers, expected status)
        ("GET", f"/points/{pid}/thumbnail", {}, {}, 401),
        ("GET", f"/points/{pid}/thumbnail", {}, wrong, 401),
        ("GET", f"/points/{pid}/thumbnail", {}, bearer, 200),
        ("GET", f"/points/{pid}/thumbnail", {}, x_key, 200),
        ("GET", f"/points/{pid}/thumbnail", signed, {}, 200),
        ("GET", f"/points/{pid}/thumbnail", {**signed, "size": 64}, {}, 200),
        ("GET", f"/points/{other}/thumbnail", signed, {}, 401),  # signed for another point
        ("GET", f"/points/{pid}/thumbnail", expired, {}, 401),
        ("GET", f"/points/{pid}/thumbnail", too_far, {}, 401),
        ("GET", f"/points/{pid}/thumbnail", forged, {}, 401),
        ("GET", f"/points/{pid}/thumbnail", tampered, {}, 401),
        ("GET", f"/points/{pid}/thumbnail", {"exp": signed["exp"]}, {}, 401),
        ("GET", f"/points/{pid}/image", {}, {}, 401),
        ("GET", f"/points/{pid}/image", signed, {}, 200),
        ("GET", f"/points/{pid}/image", expired, {}, 401),
        ("GET", f"/points/{pid}/image", {}, bearer, 200),
        ("GET", f"/points/{pid.upper()}/image", signed, {}, 200),  # the same id, spelled otherwise
        ("GET", f"/points/{pid}/similar", {}, {}, 401),
        ("GET", f"/points/{pid}/similar", signed, {}, 401),  # signatures open images only
        ("GET", f"/points/{pid}/similar", {}, bearer, 200),
        ("GET", "/points/not-a-uuid/thumbnail", {}, {}, 401),  # unknown ids say nothing without a key
        ("GET", "/points/not-a-uuid/thumbnail", {}, bearer, 404),
        ("POST", "/search/image", {}, {}, 401),
        ("POST", "/search/image", {}, wrong, 401),
        ("POST", "/search/image", {}, x_key, 200),
        ("POST", "/search", {}, {}, 401),
        ("POST", "/search", signed, {}, 401),
        ("POST", "/search", {}, bearer, 200),
        ("GET", "/", {}, {}, 200),  # the page and the docs hold no data: open, so the page can ask for the key
        ("GET", "/docs", {}, {}, 200),
        ("GET", "/healthz", {}, {}, 200),
    ]
    for method, path, params, headers, expected in cases:
        if method == "GET":
            res = locked.get(path, params=params, headers=headers)
        elif path == "/search":
            res = locked.post(path, params=params, headers=headers, json={"query": "a photo", "k": 2, "rerank_k": 4})
        else:
            res = locked.post(path, headers=headers, files={"image": ("q.png", photo, "image/png")})
        assert res.status_code == expected, (method, path, params, headers, res.status_code, res.text[:200])
        if expected == 401:
            assert res.headers.get("www-authenticate") == "Bearer" and photo[:100] not in res.content
    assert len(cases) >= 30


def test_results_carry_signed_urls_that_img_tags_can_load(locked):
    hits = locked.post("/search", json={"query": "a photo", "k": 3, "rerank_k": 6},
                       headers={"X-API-Key": KEY}).json()["results"]
    for hit in hits:
        assert "exp=" in hit["thumbnail_url"] and "sig=" in hit["image_url"]
        assert locked.get(hit["thumbnail_url"] + "&size=64").status_code == 200  # no header: the URL is enough
        assert locked.get(hit["image_url"]).status_code == 200
    exps = {h["thumbnail_url"].split("exp=")[1].split("&")[0] for h in hits}
    assert len(exps) == 1  # one expiry step: the same URL between searches, so browsers cache the thumbnails


def test_signed_url_expiry_is_short_and_stepped():
    now = [1_000_000.0]
    access = Access(["k"], clock=lambda: now[0])
    first = access.url_params("p")
    now[0] += 60
    assert access.url_params("p") == first  # same step: same URL
    assert 600 <= int(first["exp"]) - 1_000_000 <= 900
    assert access.url_ok("p", int(first["exp"]), first["sig"])
    now[0] = int(first["exp"]) + 1
    assert not access.url_ok("p", int(first["exp"]), first["sig"])
    assert Access([]).url_params("p") == {} and not Access([]).url_ok("p", 1, "x")


# --------------------------------------------------------------------------- the page and /docs work offline


def test_page_and_docs_are_served_from_the_package_with_no_cdn(client):
    import re

    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    docs = client.get("/docs")
    assert docs.status_code == 200
    for html in (page.text, docs.text):
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs and not [r for r in refs if re.match(r"(https?:)?//", r)], refs  # nothing from another host
        for ref in refs:
            if ref.startswith(("static/", "docs/")):
                res = client.get("/" + ref)
                assert res.status_code == 200 and len(res.content) > 100, ref
    assert "<script>" not in docs.text  # no inline script: the CSP forbids it
    assert client.get("/static/../service.py").status_code == 404
    assert client.get("/static/%2e%2e/service.py").status_code == 404
    assert client.get("/redoc").status_code == 404  # ReDoc needs a CDN: not offered


def test_wheel_ships_the_page(tmp_path):
    """The page's files are package data: a built wheel holds them."""
    import subprocess
    import sys
    import zipfile

    from conftest import REPO

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("edje_qdrant-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("index.html", "search.js", "search.css", "docs.html", "docs.js"):
        assert f"edje_qdrant/web/{name}" in names, sorted(n for n in names if "web" in n)
