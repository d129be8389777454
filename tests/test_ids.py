"""Point ids: UUIDv5 of the content sha256 under the fixed project namespace."""
from __future__ import annotations

import hashlib
import uuid

import pytest

from edje_qdrant.ingestion.ids import sha256_bytes, sha256_file
from edje_qdrant.schema import POINT_NAMESPACE, point_id


def test_point_id_is_uuid5_of_sha256_in_fixed_namespace():
    sha = hashlib.sha256(b"hello").hexdigest()
    pid = point_id(sha)
    assert uuid.UUID(pid).version == 5
    assert pid == str(uuid.uuid5(POINT_NAMESPACE, sha))
    # Pinned: changing the namespace would orphan every stored point.
    assert str(POINT_NAMESPACE) == "6f1c2b0e-5d3a-4e8f-9a47-3b2d8c1e7f05"
    assert pid == point_id(sha)  # deterministic
    assert pid != point_id(hashlib.sha256(b"hello!").hexdigest())


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "g" * 64, hashlib.sha256(b"x").hexdigest() + "0"])
def test_point_id_rejects_non_digests(bad):
    with pytest.raises(ValueError):
        point_id(bad)


def test_sha256_file_matches_bytes_and_reports_size(tmp_path):
    data = bytes(range(256)) * 9000  # > 1 MiB chunk, exercises the loop
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    digest, size = sha256_file(p)
    assert digest == sha256_bytes(data) == hashlib.sha256(data).hexdigest()
    assert size == len(data)
