"""Streaming multipart uploads: the file goes to a temp file in chunks, hashed as it arrives.

Starlette's own form parser also spools to disk, but only hands the file over at the end; this
one hashes and counts while bytes arrive, enforces the size limit on the file itself, and
removes the temp file on any failure, a client disconnect included.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from miniml.data.spool import Spool
from miniml.errors import BadRequest, InsufficientStorage, InvalidInput, PayloadTooLarge

MAX_FIELD_BYTES = 4096


@dataclass
class Upload:
    path: Path
    filename: str
    sha256: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


_BOUNDARY_RE = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_FILENAME_RE = re.compile(rb'filename="([^"]*)"')


def _raw_filename(disposition: bytes) -> str | None:
    """The file name as sent. python-multipart keeps only the last part of a Windows path
    ('C:\\x.csv' -> 'x.csv') but not of a POSIX one: a name with a path in either form is refused alike."""
    found = _FILENAME_RE.search(disposition)
    if found is None or b"\\" not in found.group(1):
        return None
    return found.group(1).decode("utf-8", "replace")


async def receive_upload(
    request: Request, *, tmp_dir: Path, max_bytes: int, file_field: str = "file", spool: Spool | None = None
) -> Upload:
    """Receive the multipart body; with ``spool``, readers may follow the file while it arrives
    (the spool is finished when the upload is complete, failed on any error)."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidInput(
            f"Send the file as multipart/form-data with the file in field {file_field!r} "
            f"(curl -F {file_field}=@data.csv)."
        )
    if len(boundary) > 70 or not _BOUNDARY_RE.fullmatch(boundary):
        # RFC 2046 §5.1.1: 1-70 characters from a small set; checked before anything is written.
        raise BadRequest(
            "The multipart boundary is malformed (RFC 2046 allows 1-70 letters, digits and a few "
            "punctuation marks); let your HTTP client build the body."
        )
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-", suffix=".part")
    path = Path(name)
    if spool is not None:
        spool.path = path
    out: IO[bytes] = os.fdopen(fd, "wb", buffering=0)
    digest = hashlib.sha256()
    state: dict[str, object] = {"size": 0, "is_file": False, "filename": None, "field": None, "seen_file": False}
    header_field = bytearray()
    header_value = bytearray()
    headers: dict[bytes, bytes] = {}
    value = bytearray()
    fields: dict[str, str] = {}

    def on_part_begin() -> None:
        headers.clear()
        value.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        _disp, opts = parse_options_header(headers.get(b"content-disposition", b""))
        field_name = opts.get(b"name", b"").decode("utf-8", "replace")
        state["field"] = field_name
        state["is_file"] = field_name == file_field
        if state["is_file"]:
            if state["seen_file"]:
                raise InvalidInput(f"Send exactly one file in field {file_field!r}.")
            state["seen_file"] = True
            state["filename"] = _raw_filename(headers.get(b"content-disposition", b"")) or opts.get(
                b"filename", b""
            ).decode("utf-8", "replace")
            if spool is not None:
                spool.filename = str(state["filename"])

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = memoryview(data)[start:end]
        if state["is_file"]:
            size = int(state["size"]) + len(chunk)  # type: ignore[call-overload]
            if size > max_bytes:
                raise PayloadTooLarge(
                    f"The file is larger than the upload limit ({max_bytes:,} bytes); split it or ask an admin to "
                    "raise MINIML_API__MAX_UPLOAD_BYTES."
                )
            state["size"] = size
            digest.update(chunk)
            while chunk:
                chunk = chunk[out.write(chunk) :]
        else:
            value.extend(chunk)
            if len(value) > MAX_FIELD_BYTES:
                raise InvalidInput(f"Form field {state['field']!r} is longer than {MAX_FIELD_BYTES} bytes.")

    def on_part_end() -> None:
        if not state["is_file"]:
            fields[str(state["field"])] = value.decode("utf-8", "replace")

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        told = 0
        async for chunk in request.stream():
            parser.write(chunk)
            if spool is not None and state["size"] != told:
                told = int(state["size"])  # type: ignore[call-overload]
                spool.wrote(told)
        parser.finalize()
        out.close()
        if parser.state != MultipartState.END:
            # python-multipart does not check that the closing boundary came; a cut or mis-closed
            # body would otherwise be stored as if whole.
            raise BadRequest(
                "The multipart body ends without its closing boundary; send the whole body, "
                "and let your HTTP client build it."
            )
        if not state["seen_file"]:
            raise InvalidInput(f"No file in field {file_field!r}; send it with curl -F {file_field}=@data.csv.")
        if spool is not None:
            spool.wrote(int(state["size"]))  # type: ignore[call-overload]
            spool.finish()
    except BaseException as exc:  # a disconnect included: nothing may be left behind
        if spool is not None:
            spool.fail()
        out.close()
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(
                f"The disk holding uploads ({tmp_dir}) is full; nothing of this upload was kept. "
                "Free space there (or ask the operator to), then send it again."
            ) from None
        if isinstance(exc, MultipartParseError):
            raise BadRequest(f"The multipart body is malformed ({exc}); let your HTTP client build it.") from None
        raise
    size = state["size"]
    assert isinstance(size, int)
    return Upload(path=path, filename=str(state["filename"] or ""), sha256=digest.hexdigest(), size=size, fields=fields)
