"""Arrow string columns as numpy masks and as text, without pandas; the UTF-8 policy applied to them."""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.data.chunk import Reject

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
    for chunk in chunks_of(column):
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


def chunks_of(column: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
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


def rename_columns(table: pa.Table, rename: dict[str, str]) -> pa.Table:
    return table.rename_columns([rename.get(c, c) for c in table.column_names]) if rename else table


# ---------------------------------------------------------------- whole-column checks


def _offsets(column: pa.Array) -> np.ndarray:
    return np.frombuffer(column.buffers()[1], np.int32, len(column) + 1, column.offset * 4)


def value_bytes(column: pa.Array) -> np.ndarray:
    """The bytes of a binary/string array's values, without copying."""
    offsets, data = _offsets(column), column.buffers()[2]
    return np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.empty(0, np.uint8)


# Quick whole-column checks, so that the exact per-row masks are computed only for the rare
# batch that needs them. numpy's min is a SIMD reduction: 5x faster than comparing every byte.


def has_nul(column: pa.ChunkedArray) -> bool:
    return any(len(data) and data.min() == 0 for data in map(value_bytes, column.chunks))


def empty_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Which values are "" (or null), from the offsets alone."""
    return np.concatenate([np.diff(_offsets(chunk)) == 0 for chunk in chunks_of(column)] or [np.zeros(0, bool)])


def has_empty(column: pa.ChunkedArray | pa.Array) -> bool:
    return any(len(chunk) and np.diff(_offsets(chunk)).min() == 0 for chunk in chunks_of(column))


# Bytes a whitespace-only value can start with: ASCII whitespace, or a UTF-8 lead byte (U+00A0,
# U+2003, U+3000 ... are whitespace too).
_MAY_START_BLANK = np.zeros(256, bool)
_MAY_START_BLANK[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_MAY_START_BLANK[0xC2:] = True


def may_be_blank(column: pa.ChunkedArray) -> bool:
    """False when no value can be whitespace only: no value starts with a byte that may begin a
    whitespace character. A gather of one byte per row, instead of scanning the values."""
    for chunk in column.chunks:
        offsets, data = _offsets(chunk), value_bytes(chunk)
        starts = offsets[:-1][offsets[:-1] < offsets[1:]] - offsets[0]  # non-empty values
        if _MAY_START_BLANK[data[starts]].any():
            return True
    return False
