"""Reading CSV and Parquet files in record batches, never whole in memory.

CSV: UTF-8 with or without BOM, the delimiter sniffed among , ; TAB |, quoted fields. Column
types are inferred by Arrow on the first piece (1 MiB); when a later piece disagrees (an int
column that turns float, a number column that turns text), ``batches()`` raises WidenColumn and
the first full pass (the profile) restarts with that column widened. Later passes never see it.
Pieces are parsed two at a time while the file has no quote character; from the first one on,
Arrow's streaming reader (one thread) reads the rest. Rows named in errors count from the top.
"""

from __future__ import annotations

import csv
import io
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from miniml.errors import InvalidInput

SNIFF_BYTES = 64 * 1024
DELIMITERS = [",", ";", "\t", "|"]
_BOM = b"\xef\xbb\xbf"
_CONVERSION_RE = re.compile(
    r"In CSV column #(\d+): (?:Row #\d+: )?CSV conversion error to (\w+): invalid value '(.*)'", re.DOTALL
)
_ROW_RE = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+)")


class FileFormat(StrEnum):
    csv = "csv"
    parquet = "parquet"


@dataclass
class TableFile:
    """A local file and how to read it; ``column_types`` fixes the types once a scan settled them.

    ``opener``: how to open a CSV that is still being written (an upload in progress); reads
    then wait for the bytes to arrive. None: the file at ``path`` is complete.
    """

    path: Path
    format: FileFormat
    delimiter: str = ","
    column_types: dict[str, pa.DataType] = field(default_factory=dict)
    opener: Callable[[], BinaryIO] | None = field(default=None, repr=False, compare=False)

    def open(self) -> BinaryIO:
        return self.opener() if self.opener is not None else self.path.open("rb")

    def batches(
        self, *, batch_bytes: int = 1 << 20, columns: Sequence[str] = (), types: dict[str, pa.DataType] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of the file: every column, or only ``columns``; ``types`` (every column's
        type, known after a first pass) spares a CSV pass the type inference."""
        if self.format is FileFormat.parquet:
            yield from _parquet_batches(self.path, list(columns) or None)
            return
        yield from _csv_batches(self, batch_bytes, list(columns), types or self.column_types)

    def widen(self, exc: WidenColumn) -> None:
        self.column_types[exc.column] = exc.to

    def schema(self) -> pa.Schema:
        if self.format is FileFormat.parquet:
            return pq.ParquetFile(self.path).schema_arrow
        for batch in self.batches():
            return batch.schema  # the first batch only: types are settled by the profile pass
        raise InvalidInput("The file has a header but no data rows; add at least one row.")


class WidenColumn(Exception):
    """A later block disagreed with the inferred type: the caller restarts its pass with ``widen()``."""

    def __init__(self, column: str, to: pa.DataType) -> None:
        self.column = column
        self.to = to


def detect(path: Path, *, filename: str = "") -> TableFile:
    """Check the file's format, header and delimiter; raise InvalidInput naming what is wrong."""
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if not head.strip() or head.strip() == _BOM:
        raise InvalidInput("The file is empty; upload a CSV with a header row and data rows, or a Parquet file.")
    if head.startswith(b"PAR1"):
        return _detect_parquet(path)
    if filename.lower().endswith((".parquet", ".pq")):
        raise InvalidInput(f"{filename!r} is named like a Parquet file but is not one (no PAR1 magic bytes).")
    if b"\x00" in head:
        raise InvalidInput("The file is not UTF-8 text (it holds NUL bytes); upload a CSV or Parquet file.")
    text = head.removeprefix(_BOM)
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(text) - 4:  # not just a character cut at the sniff boundary
            raise InvalidInput(
                f"The file is not valid UTF-8 (bad byte at offset {exc.start}); save it as UTF-8 CSV or Parquet."
            ) from None
        decoded = text[: exc.start].decode("utf-8")
    delimiter = _sniff_delimiter(decoded)
    header = next(csv.reader(io.StringIO(decoded), delimiter=delimiter), [])
    _check_header(header)
    return TableFile(path=path, format=FileFormat.csv, delimiter=delimiter)


def _detect_parquet(path: Path) -> TableFile:
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"The Parquet file is corrupt: {exc}.") from None
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    _check_header(names)
    if meta.num_rows == 0:
        raise InvalidInput("The Parquet file has columns but no rows; add at least one row.")
    return TableFile(path=path, format=FileFormat.parquet)


def _sniff_delimiter(text: str) -> str:
    lines = text.splitlines()[:50]
    if len(lines) > 1 and not text.endswith(("\n", "\r")):
        lines = lines[:-1]  # the last line may be cut at the sniff boundary
    best, best_cols = ",", 1
    for delim in DELIMITERS:
        counts = [len(row) for row in csv.reader(lines, delimiter=delim) if row]
        if not counts or counts[0] < 2:
            continue
        consistent = sum(c == counts[0] for c in counts) / len(counts)
        if consistent >= 0.9 and counts[0] > best_cols:
            best, best_cols = delim, counts[0]
    return best


def _check_header(names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names, start=1):
        if not name.strip():
            raise InvalidInput(f"Column {i} of the header has an empty name; give every column a name.")
        if name in seen:
            raise InvalidInput(f"Column {name!r} appears more than once in the header; column names must be unique.")
        seen.add(name)


def _csv_batches(
    table: TableFile, batch_bytes: int, columns: list[str], types: dict[str, pa.DataType], *, threads: bool = True
) -> Iterator[pa.RecordBatch]:
    with table.open() as fh:
        if threads:
            yield from _parallel_csv_batches(table, fh, batch_bytes, columns, types)
            return
        yield from _streamed_csv_batches(table, fh, batch_bytes, columns, types, threads=False)


def _streamed_csv_batches(
    table: TableFile,
    fh: BinaryIO,
    batch_bytes: int,
    columns: list[str],
    types: dict[str, pa.DataType],
    *,
    threads: bool,
    names: list[str] | None = None,
    rows_before: int = 0,
) -> Iterator[pa.RecordBatch]:
    """Arrow's streaming reader over ``fh``; with ``names``, ``fh`` starts after the header, at
    data row ``rows_before`` (the rows named in errors count from the file's start)."""
    # Without a header in the stream, its row 1 follows the header and rows_before data rows.
    shift = rows_before + (names is not None)
    reader = _open_csv(fh, table, batch_bytes, columns, types, threads, names=names, shift=shift)
    out_names = reader.schema.names
    rows = rows_before
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            message = _with_row(str(exc), table, batch_bytes, columns, types, threads)
            _raise_for_csv_error(_shift_rows(message, shift), out_names, table)
        rows += batch.num_rows
        if batch.num_rows:
            yield batch
    if rows == 0:
        raise InvalidInput("The file has a header but no data rows; add at least one row.")


# A CSV without quote characters splits safely at any line end, so its pieces are parsed on two
# threads at once (Arrow's streaming reader parses on one). Pieces are small: a few in flight.
SEGMENT_BYTES = 1 << 20
# A row longer than this goes to the streaming reader, whose blocks (STREAM_BLOCK_BYTES) bound
# the longest row it takes: one line never fills the api's memory.
MAX_PIECE_ROW_BYTES = 16 << 20
STREAM_BLOCK_BYTES = 1 << 20
SEGMENTS_IN_FLIGHT = 2


class _Segments:
    """Pieces of a byte stream that each end at a line end; ``carry`` is the unfinished line.

    Pieces are views of the bytes read (no copy); ``quoted`` says whether the last one holds a
    quote character.
    """

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size, self.carry, self.quoted = fh, size, b"", False

    def __iter__(self) -> Iterator[memoryview]:
        while True:
            block = self.fh.read(self.size)
            if not block:
                if self.carry:
                    last, self.carry = self.carry, b""
                    self.quoted = b'"' in last
                    yield memoryview(last)
                return
            data = self.carry + block if self.carry else block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                self.carry = data
                if len(data) > MAX_PIECE_ROW_BYTES:  # one endless line: not for pieces
                    self.quoted = True
                    self.carry = b""
                    yield memoryview(data)
                    return
                continue
            self.carry = data[cut:]
            self.quoted = data.find(b'"', 0, cut) >= 0
            yield memoryview(data)[:cut]


class _Chain(io.RawIOBase):
    """Bytes already read, then the rest of a stream: a streaming reader takes over from here."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.head, self.rest = memoryview(head), rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.head.nbytes:
            n = min(len(buffer), self.head.nbytes)
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _parallel_csv_batches(
    table: TableFile, fh: BinaryIO, batch_bytes: int, columns: list[str], types: dict[str, pa.DataType]
) -> Iterator[pa.RecordBatch]:
    """Record batches in file order, the pieces parsed two at a time.

    The first piece (with the header) settles the column types, as Arrow's streaming reader does
    with its first block; a later piece that disagrees raises WidenColumn the same way. From the
    first piece that holds a quote character on (a quoted field may hold a line end), the rest of
    the file goes to the streaming reader instead.
    """
    segments = _Segments(fh, SEGMENT_BYTES)
    pieces = iter(segments)
    first = next(pieces, memoryview(b""))

    def from_the_start() -> Iterator[pa.RecordBatch]:
        with table.open() as again:
            yield from _streamed_csv_batches(table, again, batch_bytes, columns, types, threads=True)

    if not first or segments.quoted:  # quoted fields: Arrow's streaming reader, from the start
        yield from from_the_start()
        return
    parse = pacsv.ParseOptions(delimiter=table.delimiter)
    head = first.tobytes().removeprefix(_BOM)
    header = next(
        csv.reader(
            [head[: head.find(b"\n") + 1 or len(head)].decode("utf-8", "replace").rstrip("\r\n")],
            delimiter=table.delimiter,
        )
    )

    def convert(column_types: dict[str, pa.DataType]) -> pacsv.ConvertOptions:
        return pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=True, include_columns=columns)

    out_names = list(columns) or header
    try:
        parsed = pacsv.read_csv(
            pa.py_buffer(first),
            read_options=pacsv.ReadOptions(use_threads=False, block_size=max(batch_bytes, len(first) + 1)),
            parse_options=parse,
            convert_options=convert(types),
        )
    except pa.ArrowInvalid as exc:
        _raise_for_csv_error(str(exc), out_names, table)
    if parsed.num_rows == 0:  # a header as long as a piece: no types to settle from, read it plainly
        yield from from_the_start()
        return
    settled = dict(types) | {f.name: f.type for f in parsed.schema}
    rows = parsed.num_rows
    yield from parsed.to_batches(max_chunksize=None)

    def parse_piece(piece: memoryview) -> pa.Table:
        # One block per piece at least: a row as long as the piece is never cut.
        read = pacsv.ReadOptions(use_threads=False, block_size=max(batch_bytes, len(piece) + 1), column_names=header)
        return pacsv.read_csv(
            pa.py_buffer(piece), read_options=read, parse_options=parse, convert_options=convert(settled)
        )

    pending: deque[Future[pa.Table]] = deque()

    def take() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        try:
            done = pending.popleft().result()
        except pa.ArrowInvalid as exc:
            _raise_for_csv_error(_shift_rows(str(exc), 1 + rows), out_names, table)
        rows += done.num_rows
        yield from done.to_batches()

    with ThreadPoolExecutor(2, thread_name_prefix="miniml-csv") as pool:
        try:
            for piece in pieces:
                if segments.quoted:  # a quoted field from here on: the streaming reader takes the rest
                    while pending:
                        yield from take()
                    tail = io.BufferedReader(_Chain(piece.tobytes() + segments.carry, fh), buffer_size=1 << 16)
                    yield from _streamed_csv_batches(
                        table,
                        tail,
                        batch_bytes,
                        columns,
                        settled,
                        threads=False,
                        names=header,
                        rows_before=rows,
                    )
                    return
                pending.append(pool.submit(parse_piece, piece))
                if len(pending) >= SEGMENTS_IN_FLIGHT:
                    yield from take()
            while pending:
                yield from take()
        finally:
            for future in pending:
                future.cancel()
    if rows == 0:
        raise InvalidInput("The file has a header but no data rows; add at least one row.")


def _shift_rows(message: str, rows: int) -> str:
    """Arrow numbers rows from where its reader started: make them count from the file's start."""
    if rows == 0:
        return message
    return re.sub(r"Row #(\d+)", lambda m: f"Row #{int(m.group(1)) + rows}", message)


def _with_row(
    message: str, table: TableFile, batch_bytes: int, columns: list[str], types: dict[str, pa.DataType], threads: bool
) -> str:
    """Threaded parsing (only ever from the file's start) does not know row numbers: find the
    failing row with a plain scan, on a handle of its own (the threaded reader's read-ahead may
    still be reading the one it failed on)."""
    if threads and not _ROW_RE.search(message) and not _CONVERSION_RE.search(message):
        return _first_error(table, batch_bytes, columns, types) or message
    return message


def _first_error(table: TableFile, batch_bytes: int, columns: list[str], types: dict[str, pa.DataType]) -> str | None:
    with table.open() as fh:
        reader = _open_csv(fh, table, batch_bytes, columns, types, False)
        while True:
            try:
                reader.read_next_batch()
            except StopIteration:
                return None
            except pa.ArrowInvalid as exc:
                return str(exc)


def _open_csv(
    fh: BinaryIO,
    table: TableFile,
    batch_bytes: int,
    columns: list[str],
    types: dict[str, pa.DataType],
    threads: bool,
    *,
    names: list[str] | None = None,
    shift: int = 0,
) -> pacsv.CSVStreamingReader:
    try:
        return pacsv.open_csv(
            fh,
            # Threads read and parse the next blocks while this one is used.
            read_options=pacsv.ReadOptions(
                use_threads=threads, block_size=max(batch_bytes, STREAM_BLOCK_BYTES), column_names=names
            ),
            parse_options=pacsv.ParseOptions(delimiter=table.delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True, include_columns=columns),
        )
    except pa.ArrowInvalid as exc:  # the first block failed
        message = _with_row(str(exc), table, batch_bytes, columns, types, threads)
        _raise_for_csv_error(_shift_rows(message, shift), [], table)
        raise  # unreachable: the call above always raises


def _raise_for_csv_error(message: str, names: list[str], table: TableFile) -> None:
    conv = _CONVERSION_RE.search(message)
    if conv and names:
        column = names[int(conv.group(1))]
        widened = pa.float64() if conv.group(2) == "int64" and _is_float(conv.group(3)) else pa.string()
        if table.column_types.get(column) != widened and table.column_types.get(column) != pa.string():
            raise WidenColumn(column, widened)
    row = _ROW_RE.search(message)
    if row:
        raise InvalidInput(
            f"Row {row.group(1)} has {row.group(3)} fields but the header has {row.group(2)}; "
            "every row needs one value per column (quote values that contain the delimiter)."
        )
    if "straddling object" in message:
        raise InvalidInput(
            f"A row is too long to read (rows over {STREAM_BLOCK_BYTES >> 20} MiB may not fit; a quoted value "
            "with line ends counts as part of one row); split very long text across rows or files."
        )
    if "Empty CSV file" in message:
        raise InvalidInput("The file is empty; upload a CSV with a header row and data rows.")
    raise InvalidInput(f"The CSV file could not be parsed: {message.split(chr(10), maxsplit=1)[0][:300]}.")


def _parquet_batches(path: Path, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    try:
        yield from pq.ParquetFile(path).iter_batches(batch_size=65536, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"The Parquet file is corrupt: {exc}.") from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
