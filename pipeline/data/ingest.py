"""Ingest: raw rows -> string-typed Parquet shards, with every unusable row set aside and accounted for.

    tunepipe stage ingest examples/quickstart.yaml --workdir runs

Reads CSV, TSV, JSONL and Parquet (optionally .gz/.zst/.bz2/.xz) from local paths, globs or fsspec
URLs (s3://bucket/*.csv), `datasets.save_to_disk` folders and `hf:NAME` datasets (data/sources.py),
streaming: no input is ever loaded whole. Output, in the stage folder:

    shards/part-SSSSS-KKKKK.parquet  shard KKKKK of source SSSSS, at most `data.shard_rows` rows; every
                                     column a string; sorted names = row order
    rejects.jsonl                    one {"file", "line", "reason", "raw"} per rejected row, in file order

`line` is the physical line where the record starts (CSV, TSV, JSONL), or the row number (Parquet,
datasets). Every record is either a row or a reject: rows_in == rows_out + rows_rejected. Blank
lines are not records. Before any row is read, every source's header (or schema) must hold the
task's required columns (`RowSpec.required_columns`, named after `data.rename`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import lzma
import zlib
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.data import readers, sources
from pipeline.config import DataConfig, RowSpec
from pipeline.data.chunk import BlockTooSmall, Chunk, Cursor, Reject
from pipeline.data.columns import arrow_mask, bool_mask, empty_values, has_empty, has_nul, may_be_blank
from pipeline.data.sources import Header, Source, SourceError

REJECTS = "rejects.jsonl"
SHARDS = "shards"
_RAW_LIMIT = 2000
_PROGRESS_MIN_BYTES = 32 << 20
# CSV block: big enough that per-batch overhead is noise, small enough that a few in flight stay
# far below the memory budget. A record larger than a block is re-read with a block 8x larger.
CSV_BLOCK_BYTES = 1 << 20
_MAX_BLOCK_BYTES = 1 << 30
# Rows are buffered into row groups of about this size: pyarrow writes one row group per
# write_table call, and thousands of 1 MB row groups slow both the writer and every later reader.
_ROW_GROUP_BYTES = 32 << 20
_PENDING_WRITES = 2  # row groups queued for the writer thread: bounds the memory in flight
# Faults inside a source that no row-level check can skip: they name the source and the line.
_READ_FAULTS = (pa.ArrowException, OSError, EOFError, UnicodeError, zlib.error, lzma.LZMAError)


class IngestError(ValueError):
    """The input cannot be ingested as configured. The message names the file (and line when known)."""


def content_fingerprint(data: DataConfig, spec: RowSpec) -> list[dict[str, Any]]:
    """The bytes behind `data.source`: a file edited in place must not reuse a stale ingest."""
    return sources.content_fingerprint(data)


# ---------------------------------------------------------------- columns, checked before any work


def _renamed(header: Header, rename: dict[str, str]) -> list[str] | None:
    return None if header.columns is None else [rename.get(c, c) for c in header.columns]


def _output_columns(found: list[tuple[Source, Header]], data: DataConfig, spec: RowSpec) -> list[str]:
    """Union of the sources' columns (after data.rename) in first-seen order, the task's columns
    included (an absent optional one stays null). Raises before anything is written when a source
    with a header or schema lacks a required column. JSONL has neither: its rows are checked one by one."""
    seen = {c for _, header in found for c in header.columns or ()}
    unknown = [old for old in data.rename if old not in seen]
    if unknown and seen:
        raise IngestError(f"data.rename: no input has column(s) {unknown}; the inputs have {sorted(seen)}")
    columns: dict[str, None] = {}
    for source, header in found:
        names = _renamed(header, data.rename)
        if names is None:
            continue
        duplicates = sorted({c for c in names if names.count(c) > 1})
        if duplicates:
            raise IngestError(f"{source.name}: data.rename gives two columns the name(s) {duplicates}")
        missing = [c for c in spec.required_columns if c not in names]
        if missing and source.format != "jsonl":
            renamed = f" ({names} after data.rename)" if data.rename else ""
            raise IngestError(
                f"{source.name}: required column(s) {missing} not found; it has columns {header.columns}{renamed}. "
                f"Name the right columns with data.*_column (the {spec.template if spec.task == 'causal_lm' else spec.task}"
                " roles) or map them with data.rename."
            )
        columns.update(dict.fromkeys(names))
    columns.update(dict.fromkeys(spec.columns.values()))
    return list(columns)


# ---------------------------------------------------------------- rejects and shards


class Rejects:
    """rejects.jsonl, written in binary so that a source read again can be cut back off exactly."""

    def __init__(self, path: Path):
        self.stream = path.open("wb")
        self.count = 0
        self.first: list[str] = []

    def add(self, file: str, rejects: list[Reject]) -> None:
        for line, reason, raw in rejects:
            self.count += 1
            if len(self.first) < 5:
                self.first.append(f"{file}:{line}: {reason}")
            text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
            record = {"file": file, "line": line, "reason": reason, "raw": text[:_RAW_LIMIT]}
            self.stream.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")

    def mark(self) -> tuple[int, int, int]:
        return self.stream.tell(), self.count, len(self.first)

    def rollback(self, mark: tuple[int, int, int]) -> None:
        position, self.count, first = mark
        del self.first[first:]
        self.stream.seek(position)
        self.stream.truncate()

    def close(self) -> None:
        self.stream.close()


class ShardWriter:
    """Parquet shards of at most `shard_rows` rows. Encoding and compressing is about half of the
    stage's CPU time, so whole row groups go to a background thread that writes them while the
    next ones are parsed (pyarrow releases the GIL for both). The caller decides the row groups and
    the shard boundaries, so the files do not depend on thread timing. Each source gets its own
    shard sequence, so that a source can be discarded and read again (`discard`)."""

    def __init__(self, folder: Path, schema: pa.Schema, shard_rows: int):
        self.folder, self.schema, self.shard_rows = folder, schema, shard_rows
        folder.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ingest-shards")
        self._pending: deque[Future] = deque()
        self.shards = 0
        self._written: list[Path] = []  # the current source's shards; the last one may be open
        self._source = 0
        self._rows = 0  # rows in the current shard
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None  # the writer thread's, except after `_wait()`

    def begin(self, source: int) -> None:
        self._source, self._written, self._rows = source, [], 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._rows == 0:
                self._written.append(self.folder / f"part-{self._source:05d}-{len(self._written):05d}.parquet")
                self.shards += 1
            take = min(table.num_rows, self.shard_rows - self._rows)
            self._buffer.append(table.slice(0, take))
            self._buffered += self._buffer[-1].nbytes
            self._rows += take
            table = table.slice(take)
            if self._rows == self.shard_rows:
                self.end()
            elif self._buffered >= _ROW_GROUP_BYTES:
                self._submit(self._written[-1], close=False)

    def end(self) -> None:
        """Close the current shard."""
        if self._rows:
            self._submit(self._written[-1], close=True)
            self._rows = 0

    def discard(self) -> None:
        """Delete what the current source wrote so far."""
        self._wait()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for path in self._written:
            path.unlink(missing_ok=True)
        self.shards -= len(self._written)
        self._written, self._rows, self._buffer, self._buffered = [], 0, [], 0

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            if self._writer is not None:
                self._writer.close()

    def _submit(self, path: Path, close: bool) -> None:
        group, self._buffer, self._buffered = self._buffer, [], 0
        self._pending.append(self._pool.submit(self._write, path, group, close))
        while len(self._pending) > _PENDING_WRITES:  # back-pressure: bounded memory
            self._pending.popleft().result()

    def _wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _write(self, path: Path, group: list[pa.Table], close: bool) -> None:
        """On the writer thread, one job at a time in submission order."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(path, self.schema)
        if group:
            table = pa.concat_tables(group)
            self._writer.write_table(table, row_group_size=table.num_rows)
        if close:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------- row checks


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns in output order; a column this source lacks is null. Extra columns were ruled out
    for sources with a header; JSONL keys beyond the first objects' are left out by its reader."""
    arrays = [
        table[name] if name in table.column_names else pa.chunked_array([pa.nulls(len(table), pa.string())])
        for name in schema.names
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _row_faults(table: pa.Table, required: list[str]) -> list[tuple[np.ndarray, str]]:
    """(mask, reason) per fault found in some row: a required value null or blank, a NUL byte anywhere.
    Cheap whole-column checks first: most batches have no fault at all."""
    faults = []
    for name in required:
        column = table[name]
        if column.null_count:
            faults.append((bool_mask(pc.is_null(column)), f"'{name}' is missing or null"))
        empty, spaces = has_empty(column), may_be_blank(column)
        if empty or spaces:
            blank = empty_values(column) if empty else np.zeros(len(column), bool)
            if spaces:
                blank |= bool_mask(pc.utf8_is_space(column))  # only whitespace; false for ""
            if blank.any():
                faults.append((blank, f"'{name}' is empty"))
    for name in table.column_names:
        # NUL is valid UTF-8, but C-string tokenizers and many tools cut the text at it.
        if has_nul(table[name]):
            faults.append((bool_mask(pc.match_substring(table[name], "\x00")), f"NUL byte in '{name}'"))
    return faults


def _drop_empty_texts(table: pa.Table, spec: RowSpec) -> tuple[pa.Table, np.ndarray | None]:
    """The `text` layout learns each row's text: a corpus's blank lines (wikitext has one between
    every paragraph) are empty rows to drop and count, not faulty rows to reject."""
    if spec.template != "text":
        return table, None
    column = table[spec.columns["text"]]
    empty = np.zeros(len(column), bool)
    if column.null_count:
        empty |= bool_mask(pc.is_null(column))
    if has_empty(column):
        empty |= empty_values(column)
    if may_be_blank(column):
        empty |= bool_mask(pc.fill_null(pc.utf8_is_space(column), False))
    if not empty.any():
        return table, None
    return table.filter(arrow_mask(~empty)), empty


def _drop_faulty(table: pa.Table, chunk: Chunk, required: list[str]) -> tuple[pa.Table, list[Reject]]:
    faults = _row_faults(table, required)
    if not faults:
        return table, []
    bad = functools.reduce(np.logical_or, (mask for mask, _ in faults))
    rows = np.flatnonzero(bad)
    values = table.filter(arrow_mask(bad)).to_pylist()
    lines = chunk.lines()
    rejects = []
    for row, value in zip(rows.tolist(), values):
        reason = next(reason for mask, reason in faults if mask[row])
        rejects.append((int(lines[row]), reason, value))
    return table.filter(arrow_mask(~bad)), rejects


# ---------------------------------------------------------------- the stage


def _read_header(source: Source) -> Header:
    try:
        return sources.read_header(source)
    except SourceError as e:
        raise IngestError(str(e)) from None
    except _READ_FAULTS as e:
        raise IngestError(f"{source.name}: cannot read its header or schema: {type(e).__name__}: {e}") from e


class _Ingest:
    """One run's outputs (shards, rejects, progress bar) and what every source added to them."""

    def __init__(self, data: DataConfig, spec: RowSpec, columns: list[str], out: Path, bytes_in: int):
        self.data, self.spec = data, spec
        self.schema = pa.schema([(c, pa.string()) for c in columns])
        self.shards = ShardWriter(out / SHARDS, self.schema, data.shard_rows)
        self.rejects = Rejects(out / REJECTS)
        self.progress = tqdm(total=bytes_in, unit="B", unit_scale=True, desc="ingest",
                             disable=None if bytes_in >= _PROGRESS_MIN_BYTES else True)  # None: only on a terminal
        self.totals: Counter = Counter()
        self.empty: list[str] = []
        self.ignored: set[str] = set()

    def source(self, index: int, source: Source, header: Header) -> None:
        block = CSV_BLOCK_BYTES
        while True:
            self.shards.begin(index)
            mark, start = self.rejects.mark(), self.progress.n
            try:
                counts = self._read(source, header, block)
                break
            except BlockTooSmall as e:
                # pyarrow cannot parse a record longer than its block; rows before it are already
                # written, so throw this source's output away and read it again with a bigger block.
                self.shards.discard()
                self.rejects.rollback(mark)
                self.progress.update(start - self.progress.n)
                if block == _MAX_BLOCK_BYTES:
                    raise IngestError(f"{source.name}, near line {e.line}: a record larger than "
                                      f"{_MAX_BLOCK_BYTES >> 20} MiB") from None
                block = min(block * 8, _MAX_BLOCK_BYTES)
        self.shards.end()
        if counts["rows_out"] + counts["rows_rejected"] == 0:
            self.empty.append(source.name)
        self.totals.update(counts)

    def _read(self, source: Source, header: Header, block_size: int) -> Counter:
        counts: Counter = Counter()
        cursor = Cursor()
        options = dict(rename=self.data.rename, policy=self.data.invalid_utf8, block_size=block_size, cursor=cursor)
        start, size = self.progress.n, sources.source_bytes(source, header)
        try:
            for chunk in readers.read(source, header, **options):
                table, empty = _drop_empty_texts(_conform(chunk.table, self.schema), self.spec)
                if empty is not None:
                    lines, kept = chunk.lines, ~empty
                    chunk = dataclasses.replace(chunk, lines=lambda lines=lines, kept=kept: lines()[kept])
                table, faulty = _drop_faulty(table, chunk, self.spec.required_columns)
                found = sorted(chunk.rejects + faulty, key=lambda r: r[0])
                self.rejects.add(source.name, found)
                self.shards.write(table)
                counts.update(rows_out=table.num_rows, rows_rejected=len(found), rows_empty=int(empty.sum()) if empty is not None else 0,
                              rows_utf8_replaced=chunk.utf8_replaced, blank_lines=chunk.blank_lines)
                self.ignored.update(chunk.ignored)
                self.progress.update(start + min(chunk.position, size) - self.progress.n)
        except BlockTooSmall:
            raise BlockTooSmall(cursor.line) from None
        except _READ_FAULTS as e:
            where = f", near line {cursor.line}" if cursor.line is not None else ""
            raise IngestError(f"{source.name}{where}: {type(e).__name__}: {e}") from e
        return counts

    def close(self) -> None:
        self.progress.close()
        self.rejects.close()
        self.shards.close()


def _check_totals(run: _Ingest, found: list[tuple[Source, Header]], out: Path) -> None:
    rows_out, rejected = run.totals["rows_out"], run.totals["rows_rejected"]
    first = "\n  ".join(run.rejects.first)
    if rows_out + rejected == 0:
        blank = f" ({run.totals['rows_empty']} rows with an empty text)" if run.totals["rows_empty"] else ""
        raise IngestError(f"every input is empty (no rows){blank}: {run.empty}")
    if rows_out == 0:
        names = [s.name for s, _ in found]
        raise IngestError(f"no usable rows in {names} ({rejected} rows read). First rejects:\n  {first}")
    if rejected / (rows_out + rejected) > run.data.max_reject_fraction:
        raise IngestError(
            f"{rejected} of {rows_out + rejected} rows rejected ({rejected / (rows_out + rejected):.1%}), more "
            f"than data.max_reject_fraction={run.data.max_reject_fraction}. All rejects: {out / REJECTS} "
            f"(kept until the next run). First rejects:\n  {first}"
        )


def run(data: DataConfig, spec: RowSpec, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict[str, Any]:
    found = [(source, _read_header(source)) for source in sources.resolve_sources(data)]
    columns = _output_columns(found, data, spec)
    bytes_in = sum(sources.source_bytes(s, h) for s, h in found)
    run = _Ingest(data, spec, columns, out, bytes_in)
    try:
        for index, (source, header) in enumerate(found):
            run.source(index, source, header)
    finally:
        run.close()
    _check_totals(run, found, out)
    return {
        "rows_in": run.totals["rows_out"] + run.totals["rows_rejected"] + run.totals["rows_empty"],
        "rows_out": run.totals["rows_out"],
        "rows_rejected": run.totals["rows_rejected"],
        "rows_empty": run.totals["rows_empty"],  # the text layout's blank rows: dropped, never rejects
        "rows_utf8_replaced": run.totals["rows_utf8_replaced"],
        "blank_lines": run.totals["blank_lines"],
        "files": len(found),
        "empty_files": len(run.empty),
        "shards": run.shards.shards,
        "bytes_in": bytes_in,
        "columns": columns,
        # JSONL keys first seen after the lines that decided the columns: left out, but not silently.
        "columns_ignored": sorted(run.ignored),
    }
