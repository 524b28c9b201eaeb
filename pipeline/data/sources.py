"""Where ingest's rows come from, and what they hash to.

`resolve_sources(data)` turns `data.source` into a stable list of sources:

    data/*.csv, data/train.jsonl.zst     files: local, globbed, compressed (.gz .zst .bz2 .xz)
    s3://bucket/raw/*.csv.gz             any fsspec URL; S3 goes to data.s3_endpoint_url or AWS_ENDPOINT_URL
    data/my_dataset                      a folder written by `datasets.save_to_disk` (split: data.hf_split)
    hf:org/name  or  hf:path/to/folder   `datasets.load_dataset(NAME, data.hf_config, split=..., revision=...)`

`content_fingerprint(data)` hashes the bytes behind them: the files, the save_to_disk folder, or the
Arrow cache files `load_dataset` prepared. `datasets` is imported only when an HF source is used:
importing it takes seconds.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.artifacts import sha256_file
from pipeline.config import DataConfig

if TYPE_CHECKING:
    import datasets

HF_PREFIX = "hf:"
_EXTENSIONS = {
    ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
}
# JSONL has no header: its columns are the keys of the first objects. Enough lines to catch a key
# that early rows leave out, few enough that checking every input stays quick.
_JSONL_KEY_LINES = 1000


class SourceError(ValueError):
    """A source cannot be read as asked; the message names it."""


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
        raw = self.fs.open(self.path, "rb", compression=self.compression)
        # zstandard's reader raises on readline() and iteration; a buffer gives it both.
        return io.BufferedReader(raw) if self.compression == "zstd" else raw

    def open_for_arrow(self):
        """For pyarrow's readers: a local uncompressed file natively, so that pyarrow's read-ahead
        thread never waits on the GIL for a Python read() (measurably slower with a writer thread)."""
        if isinstance(self.fs, LocalFileSystem) and self.compression is None:
            return pa.OSFile(self.path, "r")
        return self.open()


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face dataset: a `save_to_disk` folder on `fs`, or `hf:NAME` (fs is None)."""

    name: str
    """How rejects name it: the folder, or hf:NAME."""
    path: str
    split: str
    fs: fsspec.AbstractFileSystem | None = None
    config: str | None = None
    revision: str | None = None
    storage_options: dict = field(default_factory=dict, compare=False)
    format = "hf"

    def load(self) -> "datasets.Dataset":
        import datasets

        if self.fs is None:
            try:
                return datasets.load_dataset(self.path, self.config, split=self.split, revision=self.revision)
            except Exception as e:  # unknown name, config or split, no network: all the loader's to say
                raise SourceError(f"{self.name}: {type(e).__name__}: {e}") from e
        loaded = datasets.load_from_disk(self.fs.unstrip_protocol(self.path), storage_options=self.storage_options or None)
        if isinstance(loaded, datasets.DatasetDict):
            if self.split not in loaded:
                raise SourceError(f"{self.name}: no split '{self.split}' (it has {sorted(loaded)}); set data.hf_split")
            return loaded[self.split]
        return loaded


Source = InputFile | HFDataset


def _storage_options(url: str, data: DataConfig) -> dict[str, Any]:
    # Only an explicit setting: without it s3fs/botocore read AWS_ENDPOINT_URL themselves.
    if data.s3_endpoint_url and url.startswith(("s3://", "s3a://")):
        return {"endpoint_url": data.s3_endpoint_url}
    return {}


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
        raise SourceError(f"cannot tell the format of {path} from its extension; set data.format (csv, tsv, jsonl, parquet)")
    return fmt, compression


def _saved_dataset(fs: fsspec.AbstractFileSystem, path: str, pattern: str, data: DataConfig) -> HFDataset | None:
    """The folder `path` as a `save_to_disk` dataset, or None when it is not one."""
    if not any(fs.exists(f"{path}/{marker}") for marker in ("state.json", "dataset_dict.json")):
        return None
    return HFDataset(_display_name(fs, path), path, data.hf_split, fs, storage_options=_storage_options(pattern, data))


def resolve_sources(data: DataConfig) -> list[Source]:
    """Every source `data.source` names, in a stable order (files sorted within each pattern)."""
    patterns = [data.source] if isinstance(data.source, str) else list(data.source)
    if not patterns:
        raise SourceError("data.source names no file")
    sources: list[Source] = []
    seen: set[str] = set()
    for pattern in patterns:
        if pattern.startswith(HF_PREFIX):
            name = pattern[len(HF_PREFIX):]
            sources.append(HFDataset(pattern, name, data.hf_split, config=data.hf_config, revision=data.hf_revision))
            continue
        fs, path = fsspec.core.url_to_fs(pattern, **_storage_options(pattern, data))
        matches = {p: info for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"}
        if not matches:
            saved = _saved_dataset(fs, path.rstrip("/"), pattern, data) if fs.isdir(path) else None
            if saved is not None:
                sources.append(saved)
                continue
            hint = f" (it is a folder: name the files, e.g. '{pattern.rstrip('/')}/*.csv')" if fs.isdir(path) else ""
            raise FileNotFoundError(f"data.source: no file matches '{pattern}'{hint}")
        for p in sorted(matches):
            info = matches[p]
            key = fs.unstrip_protocol(p)
            if key in seen:
                continue
            seen.add(key)
            version = _version(info)
            fmt, compression = _format_of(p, data)
            sources.append(InputFile(fs, p, _display_name(fs, p), int(info["size"]), version, fmt, compression))
    return sources


# ---------------------------------------------------------------- columns, before any row is read


@dataclass
class Header:
    columns: list[str] | None
    """The names the source declares; None when it declares nothing (an empty file)."""
    lines: int = 1
    """Physical lines the CSV header takes (a quoted name may hold a line break)."""
    dataset: Any = None
    """HF sources: the loaded `datasets.Dataset`, read later by the same run."""
    bytes: int = 0
    """HF sources: the size of the Arrow files behind the dataset."""


def _jsonl_keys(raw) -> list[str]:
    keys: dict[str, None] = {}
    for number, line in enumerate(raw):
        if number == _JSONL_KEY_LINES:
            break
        try:
            obj = json.loads(line)
        except ValueError:  # a bad line is that row's problem, found when it is read
            continue
        if isinstance(obj, dict):
            keys.update(dict.fromkeys(obj))
    return list(keys)


def _csv_header(raw, delimiter: str) -> Header:
    # utf-8-sig: pyarrow skips a byte-order mark, so the first name must not keep it either.
    # errors="replace": the wrapper decodes a whole chunk, and a bad byte in a row is that row's problem.
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
    try:
        names = next(csv.reader(text, delimiter=delimiter), None)
    finally:
        text.detach()
    if names is None:
        return Header(None)
    return Header(names, 1 + sum(name.count("\n") for name in names))


def read_header(source: Source) -> Header:
    """The columns a source declares: the CSV header, the Parquet or dataset schema, the keys of the
    first JSONL objects. Raises a `SourceError` naming the source when they are unusable."""
    if isinstance(source, HFDataset):
        dataset = source.load()
        size = sum(os.path.getsize(c["filename"]) for c in dataset.cache_files if os.path.exists(c["filename"]))
        return Header(list(dataset.column_names), dataset=dataset, bytes=size)
    with source.open() as raw:
        if source.format == "parquet":
            header = Header(list(pq.ParquetFile(raw).schema_arrow.names))
        elif source.format == "jsonl":
            keys = _jsonl_keys(raw)
            header = Header(keys or None)
        else:
            header = _csv_header(raw, "\t" if source.format == "tsv" else ",")
    if header.columns == [] and source.format in ("csv", "tsv"):
        raise SourceError(f"{source.name}: line 1 is blank; the first line must be the header")
    if header.columns is not None:
        duplicates = sorted({c for c in header.columns if header.columns.count(c) > 1})
        if duplicates:
            raise SourceError(f"{source.name}: duplicate column names: {duplicates}")
    return header


# ---------------------------------------------------------------- fingerprint


# sha256 per (file, size, version); the runner asks for the fingerprint more than once per run.
def _version(info: dict[str, Any]) -> str:
    """What changes whenever the bytes may have: the ETag on object stores, else the mtime."""
    return str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")


_hash_cache: dict[tuple[str, int, str], str] = {}
# Local mtimes have coarse (jiffy) resolution, so a file rewritten moments after it was hashed can
# keep its size and mtime. Like git's "racily clean" rule, only cache hashes of files older than this.
_RACY_SECONDS = 2.0


def _hash(fs: fsspec.AbstractFileSystem, path: str, size: int, version: str) -> str:
    key = (fs.unstrip_protocol(path), size, version)
    digest = _hash_cache.get(key)
    if digest is None:
        digest = sha256_file(path, fs)
        local = isinstance(fs, LocalFileSystem)
        if version and (not local or time.time() - float(version) > _RACY_SECONDS):
            _hash_cache[key] = digest
    return digest


def _hash_entry(fs: fsspec.AbstractFileSystem, path: str, name: str) -> dict[str, Any]:
    info = fs.info(path)
    version = _version(info)
    size = int(info["size"])
    return {"path": name, "sha256": _hash(fs, path, size, version), "bytes": size}


def _saved_dataset_files(source: HFDataset) -> list[str]:
    """The files of a save_to_disk folder that hold the chosen split."""
    fs, root = source.fs, source.path
    if fs.exists(f"{root}/dataset_dict.json"):
        return [f"{root}/dataset_dict.json", *sorted(fs.find(f"{root}/{source.split}"))]
    return sorted(fs.find(root))


def content_fingerprint(data: DataConfig) -> list[dict[str, Any]]:
    """The bytes behind `data.source`: a file edited in place must not reuse a stale ingest."""
    entries: list[dict[str, Any]] = []
    for source in resolve_sources(data):
        if isinstance(source, InputFile):
            entries.append({"path": source.name, "sha256": _hash(source.fs, source.path, source.size, source.version),
                            "bytes": source.size})
        elif source.fs is not None:
            for path in _saved_dataset_files(source):
                entries.append(_hash_entry(source.fs, path, f"{source.name}/{path[len(source.path) + 1:]}"))
        else:
            # load_dataset prepares (or finds) Arrow files in its cache; their bytes are the rows.
            # Named by file name only: the cache folder differs between machines.
            local = fsspec.filesystem("file")
            files = [_hash_entry(local, c["filename"], Path(c["filename"]).name) for c in source.load().cache_files]
            entries.append({"path": source.name, "config": source.config, "split": source.split,
                            "revision": source.revision, "files": files})
    return entries


def source_bytes(source: Source, header: Header) -> int:
    """Bytes a source holds (the progress bar's total; `bytes_in` in the stats)."""
    return source.size if isinstance(source, InputFile) else header.bytes
