"""Collection layout for scale (shards, replication, on-disk payload/vectors/index): the create request the server
store builds, what qdrant-client's local mode reports, `info`, and a real server (QDRANT_URL / Docker, else skip)."""
from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from qdrant_client import QdrantClient, models

from edje_qdrant.cli.main import main
from edje_qdrant.errors import InputError
from edje_qdrant.store import open_store
from edje_qdrant.store.base import CollectionSpec
from edje_qdrant.store.server import ClientStore, CollectionOptions, create_collection_args

SPEC = CollectionSpec(dim=8, model="tiny-random", fingerprint="tiny-random/abc", codec="edje-tokens/v1/fp16/64x384")
FULL = CollectionOptions(shards=6, replication=2, on_disk_payload=True, on_disk_vectors=True, on_disk_index=True,
                         quantization="int8")


def test_create_request_carries_every_option():
    args = create_collection_args(SPEC, FULL)
    assert args["shard_number"] == 6 and args["replication_factor"] == 2 and args["on_disk_payload"] is True
    assert args["hnsw_config"] == models.HnswConfigDiff(on_disk=True)
    scalar = args["quantization_config"].scalar
    assert scalar.type == models.ScalarType.INT8 and scalar.always_ram is True
    clip = args["vectors_config"]["clip"]
    assert (clip.size, clip.distance, clip.on_disk) == (8, models.Distance.COSINE, True)
    assert args["metadata"] == {"edje": SPEC.to_dict()}


def test_default_options_leave_the_request_as_before():
    args = create_collection_args(SPEC, None)
    assert set(args) == {"vectors_config", "metadata"}  # server defaults for shards, replicas, on-disk parts
    assert args["vectors_config"]["clip"].on_disk is None
    assert create_collection_args(SPEC, CollectionOptions(on_disk_payload=False))["on_disk_payload"] is False


def test_bad_values_and_options_on_the_embedded_store_are_refused(tmp_path):
    with pytest.raises(InputError, match="shards must be a positive integer"):
        CollectionOptions(shards=0)
    with pytest.raises(InputError, match="replication must be a positive integer"):
        CollectionOptions(replication=True)
    with pytest.raises(InputError, match="quantization must be 'int8'"):
        CollectionOptions(quantization="binary")
    with pytest.raises(InputError, match="apply to a Qdrant server: pass --url"):
        open_store(path=str(tmp_path / "edge"), collection_options=CollectionOptions(shards=2))
    assert not (tmp_path / "edge").exists()
    res = CliRunner().invoke(main, ["ingest", str(tmp_path), "--store", str(tmp_path / "s"), "--model", "tiny-random",
                                    "--shards", "2"])
    assert res.exit_code == 1 and "pass --url" in res.output
    res = CliRunner().invoke(main, ["ingest", str(tmp_path), "--store", str(tmp_path / "s"), "--model", "tiny-random",
                                    "--gpus-per-worker", "1"])
    assert res.exit_code == 1 and "--gpus-per-worker applies to Ray workers: add --ray" in res.output


def test_local_mode_reports_what_it_keeps():
    """qdrant-client's local mode keeps the vector's on_disk flag (it has no shards): the layout read back shows it."""
    store = ClientStore(QdrantClient(location=":memory:"), collection_options=FULL)
    store.open_collection("images", SPEC)
    layout = store.collection_layout("images")
    assert layout["on_disk_vectors"] is True
    assert set(layout) == {"shards", "replication", "on_disk_payload", "on_disk_vectors", "on_disk_index",
                           "quantization"}
    assert store.connection() is None  # local mode is this process only: Ray workers cannot write to it
    plain = ClientStore(QdrantClient(location=":memory:"))
    plain.open_collection("images", SPEC)
    assert plain.collection_layout("images")["on_disk_vectors"] is None
    store.close()
    plain.close()


def test_connection_for_workers_keeps_the_server_and_key():
    client = QdrantClient(url="https://qdrant.example:6333", api_key="secret", prefer_grpc=True,
                          check_compatibility=False)
    store = ClientStore(client, url="https://qdrant.example:6333")
    conn = store.connection()
    assert conn["url"] == "https://qdrant.example:6333" and conn["api_key"] == "secret" and conn["prefer_grpc"] is True
    assert QdrantClient(**conn, check_compatibility=False).init_options["grpc_port"] == client.init_options["grpc_port"]


@pytest.mark.server
def test_server_creates_the_collection_with_the_layout(server):  # noqa: F811
    client, url = server
    name = f"edjetest-layout-{uuid.uuid4().hex[:8]}"
    options = CollectionOptions(shards=3, replication=1, on_disk_payload=True, on_disk_vectors=True,
                                on_disk_index=True, quantization="int8")
    store = ClientStore(client, url=url, collection_options=options)
    try:
        store.open_collection(name, SPEC)
        assert store.collection_layout(name) == options.to_dict()
    finally:
        client.delete_collection(name)


@pytest.mark.server
def test_server_collection_has_the_layout_and_info_shows_it(tmp_path, demo_folder):
    import os

    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip("no Qdrant server: set QDRANT_URL (e.g. a `docker run -p 6333:6333 -p 6334:6334 qdrant/qdrant`)")
    collection = f"edjetest-layout-{uuid.uuid4().hex[:8]}"
    base = ["--url", url, "--collection", collection]
    try:
        res = CliRunner().invoke(main, ["ingest", str(demo_folder), *base, "--model", "tiny-random", "--json",
                                        "--shards", "3", "--replication", "1", "--on-disk-vectors",
                                        "--on-disk-payload", "--on-disk-index", "--quantization", "int8"])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, ["info", *base, "--json"])
        info = json.loads(res.output)
        assert (info["shards"], info["replication"], info["on_disk_payload"], info["on_disk_vectors"],
                info["on_disk_index"], info["quantization"]) == (3, 1, True, True, True, "int8")
        assert info["points"] == 12
    finally:
        QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY")).delete_collection(collection)
