"""The object-store contract, on the local folder and on S3 (moto's server over HTTP)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from miniml.config import Settings
from miniml.errors import NotFound
from miniml.storage import ObjectStore, make_store


@pytest.fixture
def store(store_settings: Settings) -> ObjectStore:
    s = make_store(store_settings)
    s.prepare()
    return s


def test_put_read_delete_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"hello\x00world" * 1000)
    store.put_file("projects/1/datasets/2/x.csv", src)
    assert store.exists("projects/1/datasets/2/x.csv")
    assert b"".join(store.iter_bytes("projects/1/datasets/2/x.csv", chunk_size=777)) == src.read_bytes()
    with store.open_local("projects/1/datasets/2/x.csv") as path:
        assert path.read_bytes() == src.read_bytes()
    assert store.list_keys("projects/1/") == ["projects/1/datasets/2/x.csv"]
    uri = store.uri("projects/1/datasets/2/x.csv")
    assert store.key_for_uri(uri) == "projects/1/datasets/2/x.csv"
    store.delete("projects/1/datasets/2/x.csv")
    store.delete("projects/1/datasets/2/x.csv")  # deleting twice is fine
    assert not store.exists("projects/1/datasets/2/x.csv")
    with pytest.raises(NotFound):
        b"".join(store.iter_bytes("projects/1/datasets/2/x.csv"))


def test_large_object_goes_up_in_parts(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(1 << 20) * 40)  # 40 MiB: multipart on S3
    store.put_file("projects/1/big.bin", src)
    with store.open_local("projects/1/big.bin") as path:
        assert path.stat().st_size == src.stat().st_size
        assert path.read_bytes()[-4096:] == src.read_bytes()[-4096:]
    if hasattr(store, "client"):
        head = store.client.head_object(Bucket=store.bucket, Key=store._key("projects/1/big.bin"))  # type: ignore[attr-defined]
        assert "-" in head["ETag"]  # multipart ETags read "<md5>-<parts>"


@pytest.mark.parametrize("uri", ["file:///etc/passwd", "http://example.com/x", "s3://other/x", ""])
def test_foreign_uris_name_no_key(store: ObjectStore, uri: str) -> None:
    assert store.key_for_uri(uri) is None


def test_keys_cannot_leave_the_store(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"x")
    with pytest.raises(ValueError, match="leaves the store"):
        store.put_file("../outside", src)
    assert store.key_for_uri(store.uri("a/b").replace("a/b", "../b")) is None


def test_move_takes_the_file_and_copy_leaves_it(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "a.csv"
    src.write_bytes(b"a,b\n1,2\n")
    store.put_file("projects/1/copy.csv", src)
    assert src.exists()
    store.put_file("projects/1/moved.csv", src, move=True)
    # A local store renames the file into place; a remote one leaves the caller's file alone.
    assert src.exists() is store.remote
    for key in ("projects/1/copy.csv", "projects/1/moved.csv"):
        with store.open_local(key) as path:
            assert path.read_bytes() == b"a,b\n1,2\n"


@pytest.mark.parametrize("size", [1, 8 << 20, 1 << 30, 100 << 30, 5 << 40])
def test_s3_parts_stay_under_the_10000_part_limit(size: int) -> None:
    from miniml.storage.s3 import _transfer_for

    config = _transfer_for(size)
    assert config.multipart_chunksize >= 8 << 20
    assert -(-size // config.multipart_chunksize) <= 10_000
