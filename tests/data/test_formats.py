"""The parallel CSV path (pieces parsed side by side) reads exactly what Arrow's one-thread
streaming reader reads, on files made to stress the cuts between pieces."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from miniml.data.formats import (
    MAX_PIECE_ROW_BYTES,
    SEGMENT_BYTES,
    STREAM_BLOCK_BYTES,
    TableFile,
    _csv_batches,
    detect,
)
from miniml.errors import InvalidInput


def _read(table: TableFile, *, threads: bool) -> pa.Table:
    return pa.Table.from_batches(list(_csv_batches(table, 1 << 18, [], {}, threads=threads))).combine_chunks()


def _rows(rng: random.Random, n: int, delimiter: str, *, quotes_from: int | None) -> list[str]:
    words = ["oslo", "lisboa", "zürich", "東京", "", "naïve"]
    lines = []
    for i in range(n):
        text = rng.choice(words)
        if quotes_from is not None and i >= quotes_from and i % 50 == 0:
            text = f'"a{delimiter} b\nc ""d"""'  # the delimiter, a line end and a quote, quoted
        value = "" if i % 97 == 0 else f"{rng.uniform(-1e6, 1e6):.3f}"
        lines.append(delimiter.join([str(i), value, text, str(i % 2 == 0).lower()]))
    return lines


@pytest.mark.parametrize(
    ("delimiter", "newline", "bom", "blank_every", "quotes_from", "trailing"),
    [
        (",", "\n", False, 0, None, True),
        (";", "\r\n", True, 1000, None, False),  # CRLF, BOM, blank lines, no final line end
        ("\t", "\n", False, 0, 60_000, True),  # quoted fields from the middle on: the switch
        ("|", "\r\n", False, 777, 0, True),  # quotes from the start: the streaming reader only
    ],
)
def test_pieces_read_like_the_streaming_reader(
    tmp_path: Path, delimiter: str, newline: str, bom: bool, blank_every: int, quotes_from: int | None, trailing: bool
) -> None:
    rng = random.Random(7)
    lines = _rows(rng, 150_000, delimiter, quotes_from=quotes_from)
    if blank_every:
        for at in range(len(lines) - 1, 0, -blank_every):
            lines.insert(at, "")
    body = newline.join([delimiter.join(["id", "value", "city", "flag"]), *lines]) + (newline if trailing else "")
    path = tmp_path / "data.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode())
    assert path.stat().st_size > 3 * SEGMENT_BYTES  # several pieces
    table = detect(path, filename="data.csv")
    parallel, streamed = _read(table, threads=True), _read(table, threads=False)
    assert parallel.num_rows == 150_000
    assert parallel.schema == streamed.schema
    assert parallel.equals(streamed)


def test_a_row_longer_than_a_piece_is_carried_whole(tmp_path: Path) -> None:
    long_text = "x" * (SEGMENT_BYTES * 2 + 123)
    lines = [f"{i},{long_text if i == 5_000 else 'short'}" for i in range(20_000)]
    path = tmp_path / "long.csv"
    path.write_text("n,text\n" + "\n".join(lines) + "\n")
    parallel = _read(detect(path, filename="long.csv"), threads=True)
    assert parallel.num_rows == 20_000 and parallel.column("text")[5_000].as_py() == long_text
    assert parallel.column("n").to_pylist() == list(range(20_000))


def test_rows_too_long_to_parse_are_refused_by_name(tmp_path: Path) -> None:
    # Quoted, so the streaming reader reads it: its blocks bound a row (1 MiB).
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('n,text\n1,"' + "y" * (STREAM_BLOCK_BYTES * 3) + '"\n2,b\n')
    with pytest.raises(InvalidInput, match="row is too long to read"):
        _read(detect(quoted, filename="quoted.csv"), threads=True)
    # One line with no end at all is not carried in memory past MAX_PIECE_ROW_BYTES.
    endless = tmp_path / "endless.csv"
    endless.write_bytes(b"n,text\n1," + b"z" * (MAX_PIECE_ROW_BYTES + SEGMENT_BYTES))
    with pytest.raises(InvalidInput, match="row is too long to read"):
        _read(detect(endless, filename="endless.csv"), threads=True)
