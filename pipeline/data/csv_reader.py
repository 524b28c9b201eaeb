"""CSV and TSV for ingest: pyarrow's parser on blocks of the file, with physical line numbers kept.

A record with the wrong number of fields is set aside as a reject carrying the line where it
starts (quoted fields may span lines); blank lines are counted, never rows.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.data.chunk import BlockTooSmall, Chunk, Cursor, Reject, tell
from pipeline.data.columns import apply_utf8_policy, arrow_mask, as_text, empty_values, has_empty, rename_columns, string_array, value_bytes
from pipeline.data.sources import Header, InputFile, SourceError

def _newlines(batch: pa.RecordBatch) -> int:
    """Line breaks inside the batch's values: numpy over the raw bytes, 10x faster than count_substring."""
    return sum(int(np.count_nonzero(value_bytes(column) == 10)) for column in batch.columns)


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
                yield batch, tell(raw)
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
            yield Chunk(rename_columns(empty, rename), lambda: np.empty(0, np.int64), rejects, position)


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
    return Chunk(rename_columns(table, rename), lines, rejects, position, replaced, blank_lines)
