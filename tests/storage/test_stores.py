"""The object-store contract, on the local folder and on S3 (moto's server over HTTP)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from miniml.config import Settings
from miniml.data.spool import Spool, SpoolFailed
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


def _writer(
    spool: Spool, chunks: list[bytes], *, pause_after: int, resume: threading.Event, fail: bool = False
) -> None:
    with spool.path.open("wb") as out:
        total = 0
        for i, chunk in enumerate(chunks):
            if i == pause_after:
                resume.wait(30)
            out.write(chunk)
            out.flush()
            total += len(chunk)
            spool.wrote(total)
    spool.fail() if fail else spool.finish()


def _in_progress(store: ObjectStore) -> list[dict[str, object]]:
    client = store.client  # type: ignore[attr-defined]
    return client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])  # type: ignore[attr-defined,no-any-return]


def test_a_growing_file_goes_up_while_it_is_written(store: ObjectStore, tmp_path: Path) -> None:
    chunks = [os.urandom(1 << 20) for _ in range(20)]  # 20 MiB: three parts of 8 MiB on S3
    spool = Spool(tmp_path / "growing.csv")
    resume = threading.Event()
    writer = threading.Thread(target=_writer, args=(spool, chunks), kwargs={"pause_after": 17, "resume": resume})
    writer.start()
    done: list[BaseException | None] = []

    def put() -> None:
        try:
            store.put_growing("projects/1/grown.bin", spool.path, spool.wait_for, size_hint=20 << 20)
            done.append(None)
        except BaseException as exc:
            done.append(exc)

    putter = threading.Thread(target=put)
    putter.start()
    if store.remote:  # the first two parts are sent while the writer still waits to write the rest
        deadline = time.monotonic() + 30
        parts: list[object] = []
        while time.monotonic() < deadline and len(parts) < 2:
            uploads = _in_progress(store)
            if uploads:
                key, upload_id = uploads[0]["Key"], uploads[0]["UploadId"]
                listed = store.client.list_parts(Bucket=store.bucket, Key=key, UploadId=upload_id)  # type: ignore[attr-defined]
                parts = listed.get("Parts", [])
            time.sleep(0.1)
        assert len(parts) == 2 and not spool.done
    assert not store.exists("projects/1/grown.bin")
    resume.set()
    writer.join(30)
    putter.join(60)
    assert done == [None]
    with store.open_local("projects/1/grown.bin") as path:
        assert path.read_bytes() == b"".join(chunks)
    if store.remote:
        assert _in_progress(store) == []


def test_a_growing_file_whose_writer_fails_leaves_nothing(store: ObjectStore, tmp_path: Path) -> None:
    chunks = [os.urandom(1 << 20) for _ in range(20)]
    spool = Spool(tmp_path / "cut.csv")
    writer = threading.Thread(
        target=_writer, args=(spool, chunks), kwargs={"pause_after": -1, "resume": threading.Event(), "fail": True}
    )
    writer.start()
    with pytest.raises(SpoolFailed):
        store.put_growing("projects/1/cut.bin", spool.path, spool.wait_for, size_hint=20 << 20)
    writer.join(30)
    assert not store.exists("projects/1/cut.bin") and store.list_keys("projects/") == []
    if store.remote:
        assert _in_progress(store) == []  # the multipart upload was aborted, its parts gone


def test_spool_readers_follow_the_writer_and_learn_of_its_failure(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "f")
    spool.path.write_bytes(b"")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(spool.reader().read()))
    reader.start()
    with spool.path.open("ab") as out:
        for part in (b"abc", b"def", b"ghi"):
            out.write(part)
            out.flush()
            spool.wrote(out.tell())
            time.sleep(0.05)
            assert reader.is_alive()  # still waiting for the end
    spool.finish()
    reader.join(5)
    assert got == [b"abcdefghi"]
    again = spool.reader()
    assert again.read(4) == b"abcd" and again.seek(0) == 0 and again.read() == b"abcdefghi"
    waiting = Spool(tmp_path / "g")
    waiting.path.write_bytes(b"xy")
    waiting.wrote(2)
    errors: list[BaseException] = []

    def read_all() -> None:
        try:
            waiting.reader().read()
        except SpoolFailed as exc:
            errors.append(exc)

    failing = threading.Thread(target=read_all)
    failing.start()
    time.sleep(0.1)
    waiting.fail()
    failing.join(5)
    assert len(errors) == 1 and "before its last byte" in str(errors[0])
