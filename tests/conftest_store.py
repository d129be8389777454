"""Shared data and behaviour checks for the store tests (Edge, qdrant-client local mode, a real server).

Not a conftest: test modules import the ``check_*`` functions and run them on their own store.
"""
from __future__ import annotations

import base64
import threading
import uuid
from typing import Any

import numpy as np
import pytest

from edje_qdrant.errors import InputError, ModelMismatchError, StoreError
from edje_qdrant.store.base import CollectionSpec, PointRecord

DIM = 8
SPEC = CollectionSpec(
    dim=DIM, model="tiny-random", fingerprint="tiny-random/abc123", codec="edje-tokens/v1/fp16/64x384"
)
N_POINTS = 40
TOKENS_LEN = 65_536  # ~ the base64 size of a 49,152-byte token blob

FOLDERS = ["trips/rome", "trips/oslo", "pets"]
CAMERAS = ["Canon EOS 5D", "Pixel 8", None]
MIMES = ["image/jpeg", "image/png", "image/heic"]
GEOS = [{"lat": 41.9, "lon": 12.5}, {"lat": 59.9, "lon": 10.75}, None]


def point_id(i: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"sha256-{i}"))


def make_points(n: int = N_POINTS, seed: int = 0, start: int = 0) -> list[PointRecord]:
    """Points with random vectors and the real payload layout (tokens, metadata, model)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        month = 1 + i % 12
        meta: dict[str, Any] = {
            "source": f"/photos/{FOLDERS[i % 3]}/img{i}.jpg",
            "folder": FOLDERS[i % 3],
            "mime": MIMES[i % 3 if i % 5 else 0],
            "width": 600 + 10 * (i % 10),
            "height": 480,
            "sha256": f"{i:064x}",
        }
        if i % 4:
            meta["taken_at"] = f"{2022 + i % 3}-{month:02d}-15T12:00:00" + ("+02:00" if i % 2 else "")
        if CAMERAS[i % 3]:
            meta["camera_model"] = CAMERAS[i % 3]
        if GEOS[i % 3]:
            meta["geo"] = GEOS[i % 3]
        tokens = base64.b64encode(rng.bytes(TOKENS_LEN * 3 // 4)).decode("ascii")
        payload = {
            "page_content": f"image {i}", "metadata": meta, "edje_tokens": tokens, "edje_model": SPEC.fingerprint
        }
        out.append(PointRecord(id=point_id(i), vector=rng.normal(size=DIM).tolist(), payload=payload))
    return out


def cosine_order(points: list[PointRecord], query: list[float]) -> list[str]:
    m = np.array([p.vector for p in points], dtype=np.float64)
    q = np.array(query, dtype=np.float64)
    scores = m @ q / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))
    return [points[i].id for i in np.argsort(-scores, kind="stable")]


def filled(store: Any, name: str = "photos", points: list[PointRecord] | None = None) -> list[PointRecord]:
    pts = make_points() if points is None else points
    store.open_collection(name, SPEC)
    store.upsert(name, pts)
    return pts


# --------------------------------------------------------------------------- behaviour checks


def check_spec_create_and_verify(store: Any, prefix: str = "") -> None:
    assert store.get_spec(prefix + "specs") is None
    with pytest.raises(StoreError, match=rf"'{prefix}specs' does not exist.*edje-qdrant ingest"):
        store.open_collection(prefix + "specs", SPEC, create=False)
    store.open_collection(prefix + "specs", SPEC)
    assert store.get_spec(prefix + "specs") == SPEC
    assert prefix + "specs" in store.collections() and store.collections() == sorted(store.collections())
    # a typo'd name: the message names what the store has and how to create this one (not a bare ingest)
    with pytest.raises(StoreError, match=rf"'{prefix}spex' does not exist.*this store has: .*{prefix}specs.*"
                                         rf"ingest DIR --collection {prefix}spex"):
        store.open_collection(prefix + "spex", SPEC, create=False)
    store.open_collection(prefix + "specs", SPEC)  # same spec: fine
    store.open_collection(prefix + "specs", SPEC, create=False)
    # another preset name with the same weights fingerprint is the same model
    store.open_collection(prefix + "specs", CollectionSpec(SPEC.dim, "/path/to/tiny", SPEC.fingerprint, SPEC.codec))
    other = CollectionSpec(dim=DIM, model="minilm-dinov2", fingerprint="minilm-dinov2/ffff", codec=SPEC.codec)
    with pytest.raises(ModelMismatchError) as err:
        store.open_collection(prefix + "specs", other)
    msg = str(err.value)
    assert "'tiny-random'" in msg and "'minilm-dinov2'" in msg
    assert "--model tiny-random" in msg and "--collection" in msg
    with pytest.raises(ModelMismatchError, match="codec"):
        other_codec = "edje-tokens/v1/fp16/32x384"
        store.open_collection(prefix + "specs", CollectionSpec(DIM, SPEC.model, SPEC.fingerprint, other_codec))
    with pytest.raises(ModelMismatchError, match="dim"):
        store.open_collection(prefix + "specs", CollectionSpec(DIM * 2, SPEC.model, SPEC.fingerprint, SPEC.codec))
    assert store.get_spec(prefix + "specs") == SPEC  # a refused open changes nothing
    with pytest.raises(InputError, match="collection name"):
        store.open_collection("../escape", SPEC)


def check_query_order_and_payload(store: Any, prefix: str = "") -> None:
    pts = filled(store, prefix + "photos")
    by_id = {p.id: p for p in pts}
    query = np.random.default_rng(7).normal(size=DIM).tolist()
    expected = cosine_order(pts, query)
    hits = store.query(prefix + "photos", query, 10, ["page_content", "metadata"])
    assert [h.id for h in hits] == expected[:10]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    for h in hits:
        assert set(h.payload) == {"page_content", "metadata"}
        assert h.payload["metadata"] == by_id[h.id].payload["metadata"]
    everything = store.query(prefix + "photos", query, 3, None)
    assert everything[0].payload == by_id[expected[0]].payload  # the 65 kB blob comes back intact
    assert store.query(prefix + "photos", query, 3, [])[0].payload == {}
    nested = store.query(prefix + "photos", query, 2, ["metadata.folder"])
    assert nested[0].payload == {"metadata": {"folder": by_id[expected[0]].payload["metadata"]["folder"]}}
    assert len(store.query(prefix + "photos", query, 1000, [])) == len(pts)
    with pytest.raises(InputError, match="has 3 values"):
        store.query(prefix + "photos", [1.0, 0.0, 0.0], 5, None)
    with pytest.raises(InputError, match="limit"):
        store.query(prefix + "photos", query, 0, None)
    with pytest.raises(StoreError, match="does not exist"):
        store.query(prefix + "nope", query, 5, None)


def check_retrieve_existing_count_reupsert(store: Any, prefix: str = "") -> None:
    pts = filled(store, prefix + "photos")
    ids = [pts[5].id, point_id(999), pts[2].id]
    got = store.retrieve(prefix + "photos", ids, ["page_content"])
    assert [h.id for h in got] == [pts[5].id, pts[2].id]
    assert [h.payload for h in got] == [{"page_content": "image 5"}, {"page_content": "image 2"}]
    assert all(h.score == 0.0 for h in got)
    assert store.retrieve(prefix + "photos", [], None) == []
    upper = pts[3].id.upper()  # callers get their own spelling back
    assert store.existing_ids(prefix + "photos", [upper, pts[4].id, point_id(1000)]) == {upper, pts[4].id}
    assert store.existing_ids(prefix + "photos", []) == set()
    assert store.count(prefix + "photos") == len(pts)
    changed = PointRecord(pts[0].id, pts[0].vector, {**pts[0].payload, "page_content": "renamed"})
    store.upsert(prefix + "photos", [changed] + pts[1:5])
    assert store.count(prefix + "photos") == len(pts)
    assert store.retrieve(prefix + "photos", [pts[0].id], ["page_content"])[0].payload == {"page_content": "renamed"}
    store.upsert(prefix + "photos", [])
    with pytest.raises(InputError, match="not a UUID"):
        store.upsert(prefix + "photos", [PointRecord("img-1", pts[0].vector, {})])
    with pytest.raises(InputError, match=rf"point {pts[1].id}: vector has 2 values"):
        store.upsert(prefix + "photos", [PointRecord(pts[1].id, [1.0, 2.0], {})])
    with pytest.raises(InputError, match="not a UUID"):
        store.existing_ids(prefix + "photos", ["nope"])
    assert store.count(prefix + "photos") == len(pts)


def check_threads(store: Any, n_threads: int = 8, per_thread: int = 6, prefix: str = "") -> None:
    filled(store, prefix + "photos")
    rng = np.random.default_rng(3)
    queries = [rng.normal(size=DIM).tolist() for _ in range(n_threads * per_thread)]
    sequential = [[h.id for h in store.query(prefix + "photos", q, 5, ["page_content"])] for q in queries]
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for k in range(t, len(queries), n_threads):
                results[k] = [h.id for h in store.query(prefix + "photos", queries[k], 5, ["page_content"])]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[k] for k in range(len(queries))] == sequential


# --------------------------------------------------------------------------- filters

def _meta(p: PointRecord) -> dict[str, Any]:
    return p.payload["metadata"]


def _taken(p: PointRecord) -> np.datetime64 | None:
    t = _meta(p).get("taken_at")
    if t is None:
        return None
    base, off = (t[:-6], t[-6:]) if t.endswith("+02:00") else (t, None)
    stamp = np.datetime64(base)
    return stamp - np.timedelta64(2, "h") if off else stamp


def filter_cases() -> list[tuple[str, Any, Any]]:
    """(label, filter, predicate): the predicate is the meaning the filter must have."""
    from qdrant_client import models  # imported here: writer subprocesses skip its import cost

    return [
        ("folder", {"folder": "pets"}, lambda p: _meta(p)["folder"] == "pets"),
        ("folders", {"folder": ["pets", "trips/rome"]}, lambda p: _meta(p)["folder"] in ("pets", "trips/rome")),
        ("mime", {"mime": "image/png"}, lambda p: _meta(p)["mime"] == "image/png"),
        ("camera", {"camera": "Pixel 8"}, lambda p: _meta(p).get("camera_model") == "Pixel 8"),
        (
            "taken_window",
            {"taken_after": "2023-01-01", "taken_before": "2023-07-01T00:00:00Z"},
            lambda p: _taken(p) is not None and np.datetime64("2023-01-01") <= _taken(p) < np.datetime64("2023-07-01"),
        ),
        (
            "folder_and_after",
            {"folder": "trips/oslo", "taken_after": "2023-03-15T11:00:00"},
            lambda p: _meta(p)["folder"] == "trips/oslo" and _taken(p) is not None
            and _taken(p) >= np.datetime64("2023-03-15T11:00:00"),
        ),
        (
            "models_should_must_not",
            models.Filter(
                should=[
                    models.FieldCondition(key="metadata.folder", match=models.MatchValue(value="pets")),
                    models.FieldCondition(key="metadata.mime", match=models.MatchAny(any=["image/heic"])),
                ],
                must_not=[models.FieldCondition(
                    key="metadata.camera_model", match=models.MatchValue(value="Canon EOS 5D"))],
            ),
            lambda p: (_meta(p)["folder"] == "pets" or _meta(p)["mime"] == "image/heic")
            and _meta(p).get("camera_model") != "Canon EOS 5D",
        ),
        (
            "match_except",
            models.Filter(must=[models.FieldCondition(
                key="metadata.mime", match=models.MatchExcept(**{"except": ["image/jpeg"]}))]),
            lambda p: _meta(p)["mime"] != "image/jpeg",
        ),
        (
            "is_empty_taken_at",
            models.Filter(must=[models.IsEmptyCondition(is_empty=models.PayloadField(key="metadata.taken_at"))]),
            lambda p: "taken_at" not in _meta(p),
        ),
        (
            "geo_radius_rome",
            models.Filter(must=[models.FieldCondition(
                key="metadata.geo",
                geo_radius=models.GeoRadius(center=models.GeoPoint(lat=41.89, lon=12.49), radius=50_000.0))]),
            lambda p: _meta(p).get("geo") == GEOS[0],
        ),
        (
            "geo_box_oslo",
            models.Filter(must=[models.FieldCondition(key="metadata.geo", geo_bounding_box=models.GeoBoundingBox(
                top_left=models.GeoPoint(lat=60.5, lon=10.0), bottom_right=models.GeoPoint(lat=59.5, lon=11.0)))]),
            lambda p: _meta(p).get("geo") == GEOS[1],
        ),
        (
            "width_range",
            models.Filter(must=[models.FieldCondition(key="metadata.width", range=models.Range(gte=640, lt=680))]),
            lambda p: 640 <= _meta(p)["width"] < 680,
        ),
        (
            "has_id",
            models.Filter(must=[models.HasIdCondition(has_id=[point_id(1), point_id(2), point_id(12345)])]),
            lambda p: p.id in (point_id(1), point_id(2)),
        ),
        (
            "min_should",
            models.Filter(min_should=models.MinShould(min_count=2, conditions=[
                models.FieldCondition(key="metadata.folder", match=models.MatchValue(value="pets")),
                models.FieldCondition(key="metadata.mime", match=models.MatchValue(value="image/jpeg")),
                models.FieldCondition(key="metadata.camera_model", match=models.MatchValue(value="Pixel 8")),
            ])),
            lambda p: sum([_meta(p)["folder"] == "pets", _meta(p)["mime"] == "image/jpeg",
                           _meta(p).get("camera_model") == "Pixel 8"]) >= 2,
        ),
    ]


def filter_results(store: Any, flt: Any, points: list[PointRecord], prefix: str = "") -> list[str]:
    query = [1.0] * DIM
    return [h.id for h in store.query(prefix + "photos", query, len(points) + 5, [], filter=flt)]


def check_filters(store: Any, prefix: str = "") -> dict[str, list[str]]:
    """Every case returns exactly the points its predicate accepts, in cosine order; returns the id lists."""
    pts = filled(store, prefix + "photos")
    order = cosine_order(pts, [1.0] * DIM)
    by_id = {p.id: p for p in pts}
    out = {}
    for label, flt, pred in filter_cases():
        got = filter_results(store, flt, pts, prefix)
        want = [i for i in order if pred(by_id[i])]
        assert got == want, label
        assert want or label == "none", f"case {label} selects nothing: a weak test"
        out[label] = got
    with pytest.raises(InputError, match=r"unknown filter key\(s\) color; allowed keys: folder, taken_after"):
        store.query(prefix + "photos", [1.0] * DIM, 3, None, filter={"color": "red"})
    with pytest.raises(InputError, match="taken_after"):
        store.query(prefix + "photos", [1.0] * DIM, 3, None, filter={"taken_after": "last tuesday"})
    with pytest.raises(InputError, match="filter must be"):
        store.query(prefix + "photos", [1.0] * DIM, 3, None, filter="folder=pets")
    assert store.query(prefix + "photos", [1.0] * DIM, 3, None, filter={}) != []
    return out


def check_scroll_update_delete(store: Any, prefix: str = "") -> None:
    """scroll lists every point once; update_payloads replaces only the named keys; delete removes by id."""
    name = prefix + "sync"
    pts = filled(store, name, make_points(50, seed=4))
    by_id = {p.id: p for p in pts}
    listed = list(store.scroll(name, ["metadata"], page_size=7))  # several pages
    assert sorted(h.id for h in listed) == sorted(by_id)
    assert all(h.payload == {"metadata": by_id[h.id].payload["metadata"]} for h in listed)
    assert all(h.payload == {} for h in store.scroll(name, []))
    moved = {**pts[0].payload["metadata"], "source": "/photos/moved.jpg"}
    store.update_payloads(name, {pts[0].id: {"metadata": moved}, pts[1].id.upper(): {"page_content": "new"}})
    (h0, h1) = store.retrieve(name, [pts[0].id, pts[1].id], None)
    assert h0.payload["metadata"] == moved and h0.payload["edje_tokens"] == pts[0].payload["edje_tokens"]
    assert h0.payload["page_content"] == pts[0].payload["page_content"]
    assert h1.payload["page_content"] == "new" and h1.payload["metadata"] == pts[1].payload["metadata"]
    q = store.query(name, pts[0].vector, 1, ["metadata"])[0]  # the vector is untouched
    assert q.id == pts[0].id and q.score == pytest.approx(1.0, abs=1e-5)
    gone = [p.id for p in pts[10:30]]
    store.delete(name, gone + [point_id(999)])  # an id that is not stored is fine
    assert store.count(name) == 30
    assert store.existing_ids(name, gone) == set()
    assert sorted(h.id for h in store.scroll(name, [])) == sorted(set(by_id) - set(gone))
    store.delete(name, [])
    store.update_payloads(name, {})
    with pytest.raises(InputError, match="not a UUID"):
        store.delete(name, ["nope"])
    with pytest.raises(StoreError, match="does not exist"):
        list(store.scroll(prefix + "nope", None))
    assert store.count(name) == 30
