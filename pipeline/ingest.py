"""Ingest: raw prompt/response files -> string-typed Parquet shards, with unusable rows set aside.

Reads CSV, TSV, JSONL and Parquet (optionally .gz etc.) from local paths, globs or fsspec URLs
(s3://bucket/*.csv), streaming: no file is ever loaded whole. Output, in the stage folder:

    shards/part-00000.parquet ...   at most `data.shard_rows` rows each; every column a string
    rejects.jsonl                   one {"file", "line", "reason", "raw"} per rejected row

`line` is where the row starts: the JSONL line, the CSV record number (the header is 1, so it is
the line number unless an earlier value spans lines) or the Parquet row number. Rejects are in
the order they were found, which within a CSV block puts malformed rows first.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from pipeline.artifacts import sha256_file
from pipeline.config import DataConfig

REJECTS = "rejects.jsonl"
SHARDS = "shards"
_RAW_LIMIT = 2000
_JSONL_BATCH_ROWS = 10_000
_PARQUET_BATCH_ROWS = 65_536
_PROGRESS_MIN_BYTES = 32 << 20
_EXTENSIONS = {
    ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
}


# ---------------------------------------------------------------- finding the input files


@dataclass(frozen=True)
class InputFile:
    fs: fsspec.AbstractFileSystem
    path: str
    name: str
    """How rejects and the fingerprint name the file: relative to the working directory when local."""
    size: int
    version: str
    """Changes whenever the bytes may have: the ETag on object stores, else the mtime."""
    format: str
    compression: str | None

    def open(self):
        return self.fs.open(self.path, "rb", compression=self.compression)


def _display_name(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        rel = os.path.relpath(path)
        return path if rel.startswith("..") else Path(rel).as_posix()
    return fs.unstrip_protocol(path)


def _format_of(path: str, data: DataConfig) -> tuple[str, str | None]:
    compression = fsspec.utils.infer_compression(path)
    if data.format:
        return data.format, compression
    stem = path.rsplit(".", 1)[0] if compression else path
    fmt = _EXTENSIONS.get(os.path.splitext(stem)[1].lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path} from its extension; set data.format (csv, tsv, jsonl, parquet)")
    return fmt, compression


def resolve_inputs(data: DataConfig) -> list[InputFile]:
    """Every file `data.source` names, in a stable order (sorted within each pattern)."""
    patterns = [data.source] if isinstance(data.source, str) else list(data.source)
    if not patterns:
        raise ValueError("data.source names no file")
    files: list[InputFile] = []
    seen: set[str] = set()
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        matches = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"}
        if not matches:
            folder = fs.isdir(path)
            hint = f" (it is a folder: name the files, e.g. '{pattern.rstrip('/')}/*.csv')" if folder else ""
            raise FileNotFoundError(f"data.source: no file matches '{pattern}'{hint}")
        for p in sorted(matches):
            info = matches[p]
            key = fs.unstrip_protocol(p)
            if key in seen:
                continue
            seen.add(key)
            version = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
            fmt, compression = _format_of(p, data)
            files.append(InputFile(fs, p, _display_name(fs, p), int(info["size"]), version, fmt, compression))
    return files


# ---------------------------------------------------------------- fingerprint


# sha256 per (file, size, version); the runner asks for the fingerprint more than once per run.
_hash_cache: dict[tuple[str, int, str], str] = {}
# Local mtimes have coarse (jiffy) resolution, so a file rewritten moments after it was hashed can
# keep its size and mtime. Like git's "racily clean" rule, only cache hashes of files older than this.
_RACY_SECONDS = 2.0


def _cacheable(f: InputFile) -> bool:
    if not f.version:  # nothing tells us the bytes are unchanged
        return False
    if isinstance(f.fs, LocalFileSystem):
        return time.time() - float(f.version) > _RACY_SECONDS
    return True


def content_fingerprint(data: DataConfig) -> list[dict[str, Any]]:
    """The bytes behind `data.source`: a file edited in place must not reuse a stale ingest."""
    entries = []
    for f in resolve_inputs(data):
        key = (f.fs.unstrip_protocol(f.path), f.size, f.version)
        digest = _hash_cache.get(key)
        if digest is None:
            digest = sha256_file(f.path, f.fs)
            if _cacheable(f):
                _hash_cache[key] = digest
        entries.append({"path": f.name, "sha256": digest, "bytes": f.size})
    return entries


# ---------------------------------------------------------------- columns


def _first_jsonl_keys(raw) -> list[str]:
    for line in raw:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return list(obj)
    return []


def _columns(f: InputFile) -> list[str]:
    """The columns a file declares: the CSV header, the Parquet schema, the keys of the first JSONL object."""
    with f.open() as raw:
        if f.format == "parquet":
            return list(pq.ParquetFile(raw).schema_arrow.names)
        if f.format == "jsonl":
            return _first_jsonl_keys(raw)
        # utf-8-sig: pyarrow skips a byte-order mark, so the first name must not keep it either.
        # errors="replace": the wrapper decodes a whole chunk, and a bad byte in a row is that row's problem.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        try:
            header = next(csv.reader(text, delimiter="\t" if f.format == "tsv" else ","), [])
        finally:
            text.detach()
        duplicates = sorted({c for c in header if header.count(c) > 1})
        if duplicates:
            raise ValueError(f"{f.name}: duplicate column names in the header: {duplicates}")
        return header


def _output_columns(files: list[InputFile], data: DataConfig) -> list[str]:
    """Union of the files' columns in first-seen order. Raises, before anything is written, when a
    file with a header lacks a required column. JSONL has no header: its rows are checked one by one."""
    required = [data.prompt_column, data.response_column]
    columns: dict[str, None] = {}
    for f in files:
        found = _columns(f)
        missing = [c for c in required if c not in found]
        if missing and f.format != "jsonl":
            raise ValueError(
                f"{f.name}: required column(s) {missing} not found; the file has columns {found}. "
                "Set data.prompt_column / data.response_column to the right names."
            )
        columns.update(dict.fromkeys(found))
    columns.update(dict.fromkeys(required))
    return list(columns)


# ---------------------------------------------------------------- rejects and shards


class Rejects:
    def __init__(self, stream: TextIO):
        self.stream = stream
        self.count = 0
        self.first: list[str] = []

    def add(self, file: str, line: int | None, reason: str, raw: Any) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(f"{file}:{line if line is not None else '?'}: {reason}")
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)
        record = {"file": file, "line": line, "reason": reason, "raw": text[:_RAW_LIMIT]}
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")


class ShardWriter:
    """Splits a stream of tables into Parquet files of at most `shard_rows` rows."""

    def __init__(self, folder: Path, schema: pa.Schema, shard_rows: int):
        self.folder, self.schema, self.shard_rows = folder, schema, shard_rows
        self.shards = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.folder / f"part-{self.shards:05d}.parquet", self.schema)
                self.shards += 1
                self._rows = 0
            take = min(table.num_rows, self.shard_rows - self._rows)
            self._writer.write_table(table.slice(0, take))
            self._rows += take
            table = table.slice(take)
            if self._rows == self.shard_rows:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------- readers
#
# Each yields (table of string columns, the `line` of each row, bytes read so far).


def _read_csv(f: InputFile, columns: list[str], rejects: Rejects) -> Iterator[tuple[pa.Table, list[int], int]]:
    skipped: set[int] = set()  # record numbers of malformed rows

    def on_invalid_row(row) -> str:
        if row.number is not None:
            skipped.add(row.number)
        reason = f"expected {row.expected_columns} fields, got {row.actual_columns}"
        rejects.add(f.name, row.number, reason, row.text)
        return "skip"

    def record_numbers(last: int, count: int) -> list[int]:
        # A batch's rows are the next well-formed records: the handler has already seen every
        # malformed record of the block, so skipping those numbers gives each row its own.
        numbers = []
        for _ in range(count):
            last += 1
            while last in skipped:
                last += 1
            numbers.append(last)
        return numbers

    with f.open() as raw:
        reader = pacsv.open_csv(
            raw,
            # Single-threaded: rows then keep their record numbers and rejects a stable order.
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter="\t" if f.format == "tsv" else ",",
                newlines_in_values=True,
                invalid_row_handler=on_invalid_row,
            ),
            # Every column bytes, made text below: type inference on the first block would turn
            # "007" into 7 and fail on a later block that disagrees, and reading as string would
            # fail the whole file on one row with invalid UTF-8.
            convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in columns}),
        )
        last = 1  # the header
        for batch in reader:
            lines = record_numbers(last, batch.num_rows)
            last = lines[-1] if lines else last
            table, lines = _as_utf8(pa.Table.from_batches([batch]), lines, f, rejects)
            yield table, lines, raw.tell()


def _first_invalid_utf8(row: dict[str, bytes | None]) -> str | None:
    for name, value in row.items():
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError:
            return name
    return None


def _as_utf8(table: pa.Table, lines: list[int], f: InputFile, rejects: Rejects) -> tuple[pa.Table, list[int]]:
    """Binary columns as strings; rows with invalid UTF-8 go to the rejects."""
    schema = pa.schema([(name, pa.string()) for name in table.column_names])
    try:
        return table.cast(schema), lines
    except pa.ArrowInvalid:
        pass  # rare: find the bad rows one by one, in this batch only
    keep = []
    for row, line in zip(table.to_pylist(), lines):
        bad = _first_invalid_utf8(row)
        keep.append(bad is None)
        if bad is not None:
            raw = {k: v.decode("utf-8", "replace") for k, v in row.items() if v is not None}
            rejects.add(f.name, line, f"invalid UTF-8 in '{bad}'", raw)
    lines = [line for line, ok in zip(lines, keep) if ok]
    return table.filter(pa.array(keep)).cast(schema), lines


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _read_jsonl(f: InputFile, columns: list[str], rejects: Rejects) -> Iterator[tuple[pa.Table, list[int], int]]:
    schema = pa.schema([(c, pa.string()) for c in columns])
    rows: list[dict[str, str | None]] = []
    lines: list[int] = []
    with f.open() as raw:
        for number, line in enumerate(raw, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                rejects.add(f.name, number, f"invalid JSON: {e}", line.decode("utf-8", "replace").rstrip("\n"))
                continue
            if not isinstance(obj, dict):
                reason = f"expected a JSON object, got {type(obj).__name__}"
                rejects.add(f.name, number, reason, line.decode("utf-8", "replace").rstrip("\n"))
                continue
            rows.append({c: _as_text(obj.get(c)) for c in columns})
            lines.append(number)
            if len(rows) == _JSONL_BATCH_ROWS:
                yield pa.Table.from_pylist(rows, schema=schema), lines, raw.tell()
                rows, lines = [], []
        if rows:
            yield pa.Table.from_pylist(rows, schema=schema), lines, raw.tell()


def _read_parquet(f: InputFile, columns: list[str], rejects: Rejects) -> Iterator[tuple[pa.Table, list[int], int]]:
    with f.open() as raw:
        parquet = pq.ParquetFile(raw)
        start = 1
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            table = pa.Table.from_batches([batch])
            strings = []
            for name in table.column_names:
                try:
                    strings.append(table[name].cast(pa.string()))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    kind = table[name].type
                    raise ValueError(f"{f.name}: column '{name}' ({kind}) cannot be read as text: {e}") from None
            yield pa.table(strings, names=table.column_names), list(range(start, start + len(table))), raw.tell()
            start += len(table)


_READERS = {"csv": _read_csv, "tsv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}


# ---------------------------------------------------------------- the stage


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns in output order; a column this file lacks is null."""
    arrays = [
        table[name] if name in table.column_names else pa.chunked_array([pa.nulls(len(table), pa.string())])
        for name in schema.names
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def _drop_unusable(table: pa.Table, lines: list[int], f: InputFile, data: DataConfig, rejects: Rejects) -> pa.Table:
    """Rows whose prompt or response is missing, null or only whitespace go to the rejects."""
    checks = []
    for column in (data.prompt_column, data.response_column):
        text = table[column]
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
        checks.append((pc.is_null(text), f"'{column}' is missing or null"))
        checks.append((pc.fill_null(blank, False), f"'{column}' is empty"))
    bad = functools.reduce(pc.or_, (mask for mask, _ in checks))
    rejected = pc.indices_nonzero(bad)
    if not len(rejected):
        return table
    flags = [mask.take(rejected).to_pylist() for mask, _ in checks]
    rows = table.take(rejected).to_pylist()
    for i, index in enumerate(rejected.to_pylist()):
        reason = next(r for (_, r), flag in zip(checks, flags) if flag[i])
        rejects.add(f.name, lines[index], reason, rows[i])
    return table.filter(pc.invert(bad))


def run(data: DataConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict[str, Any]:
    files = resolve_inputs(data)
    columns = _output_columns(files, data)
    schema = pa.schema([(c, pa.string()) for c in columns])
    bytes_in = sum(f.size for f in files)
    rows_out = 0
    shards = ShardWriter(out / SHARDS, schema, data.shard_rows)
    with (out / REJECTS).open("w", encoding="utf-8") as stream, tqdm(
        total=bytes_in, unit="B", unit_scale=True, desc="ingest",
        disable=None if bytes_in >= _PROGRESS_MIN_BYTES else True,  # None: only on a terminal
    ) as progress:
        rejects = Rejects(stream)
        done = 0
        for f in files:
            try:
                for table, lines, position in _READERS[f.format](f, columns, rejects):
                    kept = _drop_unusable(_conform(table, schema), lines, f, data, rejects)
                    shards.write(kept)
                    rows_out += len(kept)
                    progress.update(done + min(position, f.size) - progress.n)
            except pa.ArrowInvalid as e:  # a fault pyarrow cannot skip past, e.g. invalid UTF-8: name the file
                raise ValueError(f"{f.name}: {e}") from None
            done += f.size
            progress.update(done - progress.n)
    shards.close()

    rows_in = rows_out + rejects.count
    first = "\n  ".join(rejects.first)
    if rows_out == 0:
        names = [f.name for f in files]
        raise ValueError(f"no usable rows in {names} ({rows_in} rows read). First rejects:\n  {first}")
    if rejects.count / rows_in > data.max_reject_fraction:
        raise ValueError(
            f"{rejects.count} of {rows_in} rows rejected ({rejects.count / rows_in:.1%}), more than "
            f"data.max_reject_fraction={data.max_reject_fraction}. All rejects: {out / REJECTS} "
            f"(kept until the next run). First rejects:\n  {first}"
        )
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_rejected": rejects.count,
        "files": len(files),
        "shards": shards.shards,
        "bytes_in": bytes_in,
        "columns": columns,
    }
