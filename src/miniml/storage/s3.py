from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.utils import ReadFileChunk

from miniml.config import StorageSettings
from miniml.errors import NotFound, UpstreamUnavailable

# Files over 8 MiB go up in parts (multipart upload), four at a time: parts of 8 MiB keep the
# process's memory small, and grow for files so large that S3's 10,000-part limit needs it.
_PART = 8 << 20
_TRANSFER = TransferConfig(multipart_threshold=_PART, multipart_chunksize=_PART, max_concurrency=4)


def _transfer_for(size: int) -> TransferConfig:
    part = max(_PART, -(-size // 9_000))
    return TransferConfig(multipart_threshold=_PART, multipart_chunksize=part, max_concurrency=4)


class S3Store:
    """Objects in one S3 bucket (MinIO in compose), under an optional prefix."""

    remote = True

    def __init__(self, settings: StorageSettings) -> None:
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/") + "/" if settings.prefix.strip("/") else ""
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )

    def _key(self, key: str) -> str:
        if ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"object key {key!r} leaves the store")
        return self.prefix + key

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(
                    f"The stored file is missing from the object store ({what}); upload the data again."
                ) from exc
            raise UpstreamUnavailable(f"S3 refused {what} ({code}); check the bucket and credentials.") from exc
        except BotoCoreError as exc:
            raise UpstreamUnavailable(f"S3 did not answer {what}: {type(exc).__name__}; retry later.") from exc

    def prepare(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._call("create bucket", self.client.create_bucket, Bucket=self.bucket)

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        config = _transfer_for(path.stat().st_size)
        self._call("upload", self.client.upload_file, str(path), self.bucket, self._key(key), Config=config)

    def put_growing(self, key: str, path: Path, wait_for: Callable[[int], int], *, size_hint: int) -> None:
        """Store a file that is still being written, a part as soon as its bytes are on disk.

        ``wait_for(n)`` blocks until the file holds n bytes or is complete and returns how many
        it holds (raising when the writer failed). Parts are read from the file as they are sent,
        two at a time (the upload's pace is set by its arrival and profile, and more requests in
        flight only cost CPU on a small machine), never held whole in memory. On any failure the
        multipart upload is aborted: no object, no parts left in the bucket.
        """
        target = self._key(key)
        part = _transfer_for(size_hint).multipart_chunksize
        have = wait_for(part + 1)
        if have <= part:  # complete and small: one request
            with path.open("rb") as body:
                self._call("upload", self.client.put_object, Bucket=self.bucket, Key=target, Body=body)
            return
        upload = self._call(
            "upload", self.client.create_multipart_upload, Bucket=self.bucket, Key=target, ChecksumAlgorithm="CRC32"
        )["UploadId"]
        try:
            with ThreadPoolExecutor(2, thread_name_prefix="miniml-s3-part") as pool:
                sent: list[Future[dict[str, Any]]] = []
                offset = 0
                while True:
                    have = wait_for(offset + part + 1)  # one byte more: is this part the last?
                    length = min(part, have - offset)
                    if length <= 0:
                        break
                    sent.append(pool.submit(self._part, target, upload, len(sent) + 1, path, offset, length))
                    offset += length
                    if any(f.done() and f.exception() for f in sent):
                        break
                parts = [f.result() for f in sent]
            self._call(
                "upload",
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=target,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=target, UploadId=upload)
            raise

    def _part(self, target: str, upload: str, number: int, path: Path, offset: int, length: int) -> dict[str, Any]:
        with ReadFileChunk.from_filename(str(path), offset, length, enable_callbacks=False) as body:
            answer = self._call(
                "upload",
                self.client.upload_part,
                Bucket=self.bucket,
                Key=target,
                UploadId=upload,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC32",
            )
        return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": answer["ChecksumCRC32"]}

    def iter_bytes(self, key: str, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        body = self._call("download", self.client.get_object, Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def download(self, key: str, path: Path) -> None:
        self._call("download", self.client.download_file, self.bucket, self._key(key), str(path), Config=_TRANSFER)

    @contextmanager
    def open_local(self, key: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="miniml-s3-") as tmp:
            path = Path(tmp) / "object"
            self.download(key, path)
            yield path

    def delete(self, key: str) -> None:
        self._call("delete", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise UpstreamUnavailable("S3 refused a lookup; check the bucket and credentials.") from exc
        return True

    def list_keys(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call(
            "list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix))
        ):
            keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def key_for_uri(self, uri: str) -> str | None:
        head = f"s3://{self.bucket}/{self.prefix}"
        if not uri.startswith(head):
            return None
        key = uri[len(head) :]
        if not key or ".." in key.split("/") or key.startswith("/"):
            return None
        return key
