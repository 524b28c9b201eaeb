"""Readers for ingest: one source in, `Chunk`s of string columns out, streaming.

Each reader sets aside what cannot be a row (a CSV record with the wrong number of fields, a JSONL
line that is no JSON object, invalid UTF-8 under data.invalid_utf8=reject) as rejects carrying the
PHYSICAL line where the record starts; Parquet and dataset rows are numbered from 1 instead.
Nothing is type-inferred: every value is text, so "007" stays "007".
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.sources import Header, HFDataset, InputFile, Source, SourceError

Reject = tuple[int, str, Any]
"""(line, reason, raw): raw is the record's text, or its values when only those are known."""

BOM = b"\xef\xbb\xbf"
_JSONL_BATCH_ROWS = 10_000
_TABLE_BATCH_ROWS = 65_536


class BlockTooSmall(Exception):
    """A CSV record is larger than the reader's block (pyarrow's "straddling object"): read the
    file again with a larger one."""

    def __init__(self, line: int | None = None):
        super().__init__(line)
        self.line = line


@dataclass
class Chunk:
    table: pa.Table
    """String columns, named after data.rename; the reader's own rejects are already gone."""
    lines: Callable[[], np.ndarray]
    """The start line of each row of `table`; computed only when a row is rejected later."""
    rejects: list[Reject] = field(default_factory=list)
    position: int = 0
    """Bytes of the source consumed so far, for the progress bar."""
    utf8_replaced: int = 0
    blank_lines: int = 0
    ignored: set[str] = field(default_factory=set)
    """JSONL keys outside the columns (which the first objects' keys decided): not written."""


@dataclass
class Cursor:
    """Where a reader is, so that an error it cannot skip past can name the line."""

    line: int | None = None


def _tell(raw) -> int:
    try:
        return raw.tell()
    except (OSError, ValueError):  # io.UnsupportedOperation: some decompressors cannot tell
        return 0


# ---------------------------------------------------------------- arrow <-> numpy, without pandas
#
# pyarrow's own conversions between Python or numpy values and arrays (pa.array, to_numpy,
# pa.scalar, from_pylist) import pandas on first use: a third of a second, as long as reading a
# 300 MB file. These build and read the buffers directly instead.


def _bits(buffer: pa.Buffer, offset: int, length: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(buffer, np.uint8), bitorder="little")[offset:offset + length].astype(bool)


def bool_mask(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean column as numpy, null as False."""
    parts = [np.zeros(0, bool)]
    for chunk in _chunks(column):
        validity, values = chunk.buffers()
        bits = _bits(values, chunk.offset, len(chunk))
        if chunk.null_count:
            bits &= _bits(validity, chunk.offset, len(chunk))
        parts.append(bits)
    return np.concatenate(parts)


def arrow_mask(mask: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.bool_(), len(mask), [None, pa.py_buffer(np.packbits(mask, bitorder="little"))])


def string_array(values: list[bytes | None]) -> pa.Array:
    """A string array from values already encoded as UTF-8."""
    missing = np.fromiter((v is None for v in values), bool, len(values))
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(np.fromiter((len(v) if v is not None else 0 for v in values), np.int64, len(values)), out=offsets[1:])
    data = pa.py_buffer(b"".join(v for v in values if v is not None))
    validity = pa.py_buffer(np.packbits(~missing, bitorder="little")) if missing.any() else None
    # int64 offsets: a batch of long lines may pass 2 GiB; the cast checks whether it fits.
    array = pa.Array.from_buffers(pa.large_string(), len(values), [validity, pa.py_buffer(offsets), data])
    return array.cast(pa.string())


def _chunks(column: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


# ---------------------------------------------------------------- values as text


def _json_text(column: pa.Array) -> pa.Array:
    values = column.to_pylist()
    return string_array([None if v is None else json.dumps(v, ensure_ascii=False, default=str).encode() for v in values])


def _decode_rows(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary values as UTF-8, bad bytes replaced by U+FFFD; also which rows had bad bytes."""
    values, bad = column.to_pylist(), np.zeros(len(column), bool)
    for i, value in enumerate(values):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                values[i], bad[i] = value.decode("utf-8", "replace").encode(), True
    return string_array(values), bad


def _column_as_text(column: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _column_as_text(column.dictionary_decode())
    if pa.types.is_nested(kind):
        return _json_text(column), None
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        try:
            return column.cast(pa.string()), None  # validates UTF-8: the fast path
        except pa.ArrowInvalid:
            return _decode_rows(column)
    try:
        return column.cast(pa.string()), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. a type arrow cannot print
        return _json_text(column), None


def as_text(table: pa.Table | pa.RecordBatch) -> tuple[pa.Table, np.ndarray | None, list[str | None]]:
    """Every column as pa.string(): binary decoded as UTF-8 (bad bytes become U+FFFD), nested values
    as JSON text, anything else through arrow's cast. Also returns which rows had invalid UTF-8
    (None when none did) and, per row, the first column that had it."""
    columns, bad_any, bad_column = [], None, None
    for name, column in zip(table.column_names, table.columns):
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        text, bad = _column_as_text(column)
        columns.append(text)
        if bad is not None and bad.any():
            if bad_any is None:
                bad_any, bad_column = np.zeros(len(table), bool), [None] * len(table)
            for i in np.flatnonzero(bad & ~bad_any):
                bad_column[i] = name
            bad_any |= bad
    return pa.Table.from_arrays(columns, names=table.column_names), bad_any, bad_column


def apply_utf8_policy(table: pa.Table, bad: np.ndarray | None, bad_column: list, policy: str, lines: Callable[[], np.ndarray]
                      ) -> tuple[pa.Table, np.ndarray | None, list[Reject], int]:
    """`replace` keeps the rows (counted); `reject` sets them aside. Returns the table, the rows kept
    (None: all), the rejects and the number of rows whose bytes were replaced."""
    if bad is None:
        return table, None, [], 0
    if policy == "replace":
        return table, None, [], int(bad.sum())
    starts = lines()
    rows = table.filter(arrow_mask(bad)).to_pylist()
    rejects = [(int(starts[i]), f"invalid UTF-8 in '{bad_column[i]}'", row) for i, row in zip(np.flatnonzero(bad), rows)]
    return table.filter(arrow_mask(~bad)), ~bad, rejects, 0


def _rename(table: pa.Table, rename: dict[str, str]) -> pa.Table:
    return table.rename_columns([rename.get(c, c) for c in table.column_names]) if rename else table


# ---------------------------------------------------------------- CSV and TSV


def _offsets(column: pa.Array) -> np.ndarray:
    return np.frombuffer(column.buffers()[1], np.int32, len(column) + 1, column.offset * 4)


def _data(column: pa.Array) -> np.ndarray:
    """The bytes of a binary/string array's values, without copying."""
    offsets, data = _offsets(column), column.buffers()[2]
    return np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.empty(0, np.uint8)


# Quick whole-column checks, so that the exact per-row masks are computed only for the rare
# batch that needs them. numpy's min is a SIMD reduction: 5x faster than comparing every byte.


def has_nul(column: pa.ChunkedArray) -> bool:
    return any(len(data) and data.min() == 0 for data in map(_data, column.chunks))


def empty_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Which values are "" (or null), from the offsets alone."""
    return np.concatenate([np.diff(_offsets(chunk)) == 0 for chunk in _chunks(column)] or [np.zeros(0, bool)])


def has_empty(column: pa.ChunkedArray | pa.Array) -> bool:
    return any(len(chunk) and np.diff(_offsets(chunk)).min() == 0 for chunk in _chunks(column))


# Bytes a whitespace-only value can start with: ASCII whitespace, or a UTF-8 lead byte (U+00A0,
# U+2003, U+3000 ... are whitespace too).
_MAY_START_BLANK = np.zeros(256, bool)
_MAY_START_BLANK[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_MAY_START_BLANK[0xC2:] = True


def may_be_blank(column: pa.ChunkedArray) -> bool:
    """False when no value can be whitespace only: no value starts with a byte that may begin a
    whitespace character. A gather of one byte per row, instead of scanning the values."""
    for chunk in column.chunks:
        offsets, data = _offsets(chunk), _data(chunk)
        starts = offsets[:-1][offsets[:-1] < offsets[1:]] - offsets[0]  # non-empty values
        if _MAY_START_BLANK[data[starts]].any():
            return True
    return False


def _newlines(batch: pa.RecordBatch) -> int:
    """Line breaks inside the batch's values: numpy over the raw bytes, 10x faster than count_substring."""
    return sum(int(np.count_nonzero(_data(column) == 10)) for column in batch.columns)


def _row_spans(batch: pa.RecordBatch) -> np.ndarray:
    """Physical lines each row takes: one, plus the line breaks inside its quoted values."""
    spans = np.ones(batch.num_rows, np.int64)
    for column in batch.columns:
        counts = pc.count_substring_regex(column, "\n")  # int32, no nulls: binary CSV values never are
        spans += np.frombuffer(counts.buffers()[1], np.int32, len(counts), counts.offset * 4)
    return spans


def _starts(first: int, spans: np.ndarray) -> np.ndarray:
    return first + np.cumsum(spans) - spans


@dataclass
class _InvalidRow:
    number: int | None
    text: str
    reason: str


class _LineCounter:
    """Where each CSV record starts. pyarrow numbers records (header 1, a blank line counts as
    one), not lines: after a quoted value with a line break the two drift apart, so every record's
    line breaks are counted, per batch when nothing in it is rejected, per row when something is."""

    def __init__(self, header_lines: int):
        self.record = 2
        self.line = 1 + header_lines

    def skip(self, batch: pa.RecordBatch) -> int:
        """Advance over a batch with no invalid record; returns the line its first row starts on."""
        first = self.line
        self.record += batch.num_rows
        self.line += batch.num_rows + _newlines(batch)
        return first

    def after(self, batch: pa.RecordBatch, row: _InvalidRow) -> bool:
        """Whether an invalid record comes after all of the batch's rows. pyarrow parses a block
        ahead, so the handler has usually seen the next block's invalid records already."""
        return row.number is not None and row.number >= self.record + batch.num_rows

    def place(self, spans: np.ndarray, invalid: list[_InvalidRow]) -> tuple[np.ndarray, list[Reject]]:
        """Start lines of a batch's rows, with the invalid records that fall between them (in the
        serial reader they are known, numbered, before their batch is handed out)."""
        starts = np.empty(len(spans), np.int64)
        rejects: list[Reject] = []
        for i, span in enumerate(spans.tolist()):
            rejects += self.drain(invalid)
            starts[i] = self.line
            self.line += span
            self.record += 1
        rejects += self.drain(invalid)
        return starts, rejects

    def drain(self, invalid: list[_InvalidRow], everything: bool = False) -> list[Reject]:
        rejects = []
        while invalid and (everything or invalid[0].number in (None, self.record)):
            row = invalid.pop(0)
            rejects.append((self.line, row.reason, row.text))
            self.line += 1 + row.text.count("\n")
            self.record += 1
        return rejects


def _blank_rows(batch: pa.RecordBatch) -> np.ndarray | None:
    """Rows whose every field is empty: a blank line (pyarrow makes one of those a row of empty
    values) or one holding only delimiters. None when there are none, the common case."""
    if not has_empty(batch.column(0)):
        return None
    blank = empty_values(batch.column(0))
    for column in batch.columns[1:]:
        blank &= empty_values(column)
    return blank if blank.any() else None


def _csv_batches(raw, name: str, header: list[str], delimiter: str, block_size: int, invalid: list[_InvalidRow]):
    def on_invalid_row(row) -> str:
        reason = f"expected {row.expected_columns} fields, got {row.actual_columns}"
        invalid.append(_InvalidRow(row.number, row.text, reason))
        return "skip"

    try:
        reader = pacsv.open_csv(
            raw,
            # Serial: only then does pyarrow number invalid records (threads give None), and the
            # numbers place them between the rows. Parquet writing runs on its own thread instead.
            read_options=pacsv.ReadOptions(use_threads=False, block_size=block_size),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                newlines_in_values=True,
                ignore_empty_lines=False,  # a skipped blank line would shift every later line number
                invalid_row_handler=on_invalid_row,
            ),
            # Bytes, made text later: inference would turn "007" into 7 (and fail on a later block
            # that disagrees), and reading as string would fail the whole file on one bad byte.
            convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in header}),
        )
        if reader.schema.names != header:
            raise SourceError(f"{name}: the header parses two ways: {reader.schema.names} (pyarrow), {header} (csv)")
        while True:
            try:
                batch = reader.read_next_batch()
                # Taken here, on the parsing thread: from the consumer, tell() waits for the
                # parser's read in flight to release the file.
                yield batch, _tell(raw)
            except StopIteration:
                return
    except pa.ArrowInvalid as e:
        if "straddl" in str(e):
            raise BlockTooSmall() from None
        if "Empty CSV file" in str(e):
            return  # a header without a line break after it: no rows
        raise


_END = object()


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced on a background thread up to `depth` ahead.

    pyarrow's CSV parser releases the GIL, so the next block is parsed while this thread checks
    and converts the current one. The parser itself must stay serial (only then does it number
    invalid records), so this is the parallelism there is on the read side.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((_END, error))

    thread = threading.Thread(target=produce, name="csv-parse", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


def read_csv(source: InputFile, header: Header, *, rename: dict[str, str], policy: str, block_size: int,
             cursor: Cursor) -> Iterator[Chunk]:
    if header.columns is None:  # an empty file
        return
    invalid: list[_InvalidRow] = []
    counter = _LineCounter(header.lines)
    cursor.line = counter.line
    delimiter = "\t" if source.format == "tsv" else ","
    with source.open_for_arrow() as raw, contextlib.closing(
        prefetched(_csv_batches(raw, source.name, header.columns, delimiter, block_size, invalid))
    ) as batches:
        position = 0
        for batch, position in batches:
            if invalid and not counter.after(batch, invalid[0]):
                starts, rejects = counter.place(_row_spans(batch), invalid)
                lines = lambda starts=starts: starts
            else:
                first, rejects = counter.skip(batch), []
                lines = lambda batch=batch, first=first: _starts(first, _row_spans(batch))
            cursor.line = counter.line  # where the next record starts: any error is at or after it
            yield _csv_chunk(batch, lines, rejects, rename, policy, position)
        rejects = counter.drain(invalid, everything=True)  # invalid records after the last row
        if rejects:
            empty = pa.Table.from_arrays([string_array([])] * len(header.columns), names=header.columns)
            yield Chunk(_rename(empty, rename), lambda: np.empty(0, np.int64), rejects, position)


def _csv_chunk(batch: pa.RecordBatch, lines: Callable[[], np.ndarray], rejects: list[Reject],
               rename: dict[str, str], policy: str, position: int) -> Chunk:
    blank = _blank_rows(batch)
    if blank is not None:
        batch, all_lines = batch.filter(arrow_mask(~blank)), lines
        lines = lambda: all_lines()[~blank]
    table, bad, bad_column = as_text(batch)
    table, kept, utf8_rejects, replaced = apply_utf8_policy(table, bad, bad_column, policy, lines)
    if kept is not None:
        before = lines
        lines = lambda: before()[kept]
    rejects = sorted(rejects + utf8_rejects, key=lambda r: r[0])
    blank_lines = 0 if blank is None else int(blank.sum())
    return Chunk(_rename(table, rename), lines, rejects, position, replaced, blank_lines)


# ---------------------------------------------------------------- JSONL


def _value_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _utf8(value: str | None, policy: str) -> bytes | None:
    """Raises UnicodeEncodeError for an unpaired surrogate (a JSON "\\ud800" escape) under `reject`."""
    if value is None:
        return None
    try:
        return value.encode()
    except UnicodeEncodeError:
        if policy == "reject":
            raise
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def _parse_jsonl_line(line: bytes, columns: list[str], policy: str) -> tuple[list[bytes | None], bool, dict]:
    """The values of the object on a line as UTF-8, whether invalid UTF-8 in it was replaced, the object.
    Raises ValueError (with the reject reason) for a line that is not a row."""
    replaced = False
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        if policy == "reject":
            raise ValueError("invalid UTF-8") from None
        obj, replaced = json.loads(line.decode("utf-8", "replace")), True
    except ValueError as e:
        raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    try:
        return [_utf8(_value_text(obj.get(c)), policy) for c in columns], replaced, obj
    except UnicodeEncodeError:
        raise ValueError("invalid UTF-8 (an unpaired surrogate escape)") from None


def _empty_chunk() -> Chunk:
    return Chunk(pa.table({}), lambda: np.empty(0, np.int64))


def read_jsonl(source: InputFile, header: Header, *, rename: dict[str, str], policy: str, block_size: int,
               cursor: Cursor) -> Iterator[Chunk]:
    columns = header.columns or []
    known, names = set(columns), [rename.get(c, c) for c in columns]
    chunk, values, lines, size = _empty_chunk(), [[] for _ in columns], [], 0

    def finish(position: int) -> Chunk:
        arrays = [string_array(column) for column in values] or [string_array([None] * len(lines))]
        chunk.table = pa.Table.from_arrays(arrays, names=names or ["_"]).select(names)
        chunk.lines = lambda starts=np.array(lines, np.int64): starts
        chunk.position = position
        return chunk

    with source.open() as raw:
        for number, line in enumerate(raw, start=1):
            cursor.line = number
            if number == 1 and line.startswith(BOM):
                line = line[len(BOM):]
            if not line.strip():
                continue
            try:
                row, replaced, obj = _parse_jsonl_line(line, columns, policy)
            except ValueError as e:
                chunk.rejects.append((number, str(e), line.decode("utf-8", "replace").rstrip("\r\n")))
                continue
            chunk.utf8_replaced += replaced
            if not known.issuperset(obj):
                chunk.ignored.update(k for k in obj if k not in known)
            for column, value in zip(values, row):
                column.append(value)
            lines.append(number)
            size += len(line)
            if len(lines) == _JSONL_BATCH_ROWS or size >= block_size:
                yield finish(_tell(raw))
                chunk, values, lines, size = _empty_chunk(), [[] for _ in columns], [], 0
        if lines or chunk.rejects:
            yield finish(_tell(raw))


# ---------------------------------------------------------------- Parquet and HF datasets


def _table_chunks(batches, rename: dict[str, str], policy: str, total_rows: int, size: int, cursor: Cursor):
    start = 1
    for batch in batches:
        cursor.line = start
        lines = lambda start=start, n=batch.num_rows: np.arange(start, start + n)
        table, bad, bad_column = as_text(batch)
        table, kept, rejects, replaced = apply_utf8_policy(table, bad, bad_column, policy, lines)
        if kept is not None:
            lines = lambda before=lines, kept=kept: before()[kept]
        start += batch.num_rows
        position = size * (start - 1) // max(total_rows, 1)
        yield Chunk(_rename(table, rename), lines, rejects, position, replaced)


def read_parquet(source: InputFile, header: Header, *, rename: dict[str, str], policy: str, block_size: int,
                 cursor: Cursor) -> Iterator[Chunk]:
    with source.open_for_arrow() as raw:
        parquet = pq.ParquetFile(raw)
        batches = parquet.iter_batches(batch_size=_TABLE_BATCH_ROWS)
        yield from _table_chunks(batches, rename, policy, parquet.metadata.num_rows, source.size, cursor)


def read_dataset(source: HFDataset, header: Header, *, rename: dict[str, str], policy: str, block_size: int,
                 cursor: Cursor) -> Iterator[Chunk]:
    dataset = header.dataset
    # Arrow slices of the memory-mapped cache: the rows are never all in memory (nor in Python).
    batches = dataset.with_format("arrow").iter(batch_size=_TABLE_BATCH_ROWS)
    yield from _table_chunks(batches, rename, policy, len(dataset), header.bytes, cursor)


READERS: dict[str, Callable[..., Iterator[Chunk]]] = {
    "csv": read_csv, "tsv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet, "hf": read_dataset,
}


def read(source: Source, header: Header, **options) -> Iterator[Chunk]:
    return READERS[source.format](source, header, **options)
