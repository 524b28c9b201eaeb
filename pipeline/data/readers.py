"""Readers for ingest: one source in, `Chunk`s of string columns out, streaming.

Each reader sets aside what cannot be a row (a CSV record with the wrong number of fields, a JSONL
line that is no JSON object, invalid UTF-8 under data.invalid_utf8=reject) as rejects carrying the
PHYSICAL line where the record starts; Parquet and dataset rows are numbered from 1 instead.
Nothing is type-inferred: every value is text, so "007" stays "007".
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.chunk import BOM, Chunk, Cursor, tell
from pipeline.data.columns import apply_utf8_policy, as_text, rename_columns, string_array
from pipeline.data.csv_reader import read_csv
from pipeline.data.sources import Header, HFDataset, InputFile, Source

_JSONL_BATCH_ROWS = 10_000
_TABLE_BATCH_ROWS = 65_536


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
                yield finish(tell(raw))
                chunk, values, lines, size = _empty_chunk(), [[] for _ in columns], [], 0
        if lines or chunk.rejects:
            yield finish(tell(raw))


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
        yield Chunk(rename_columns(table, rename), lines, rejects, position, replaced)


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
