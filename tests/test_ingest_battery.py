"""A battery of small malformed inputs: every record is accounted for, at its physical line.

A seeded generator writes CSV, TSV and JSONL files mixing every fault ingest knows (wrong field
counts, invalid UTF-8, NUL bytes, blank values, blank lines, BOMs, CRLF, quoted line breaks and
quotes, values that look like numbers, records larger than the reader's block, empty and
header-only files). It knows each record it wrote: where it starts, and whether it is a row
(with which values) or a reject (with which reason). Each file is ingested alone, then all together.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import read_rejects

from pipeline.data import ingest
from pipeline.config import build_config

FILES = 300
BOM = b"\xef\xbb\xbf"
COLUMNS = ("prompt", "response", "id")
WORDS = ["alpha", "beta", "gamma,", 'say "hi"', "ünï", "✓", "007", "1e5", "true", "-3.50", "NaN", "null", "tab\there"]
# The battery shrinks the reader's block so that "huge" records (a few blocks long) stay small.
BLOCK = 1024


@dataclass
class Expected:
    """What a generated file must give: its rows' values, its rejects' (line, reason)."""

    rows: list[dict] = field(default_factory=list)
    rejects: list[tuple[int, str]] = field(default_factory=list)
    replaced: int = 0

    @property
    def records(self) -> int:
        return len(self.rows) + len(self.rejects)


def _text(rng: random.Random, huge: bool = False) -> str:
    words = rng.choices(WORDS, k=rng.randint(1, 6))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words) + 1), rng.choice(["\n", "\r\n", "\n\n"]))
    if huge:
        words += ["word"] * (3 * BLOCK // 5) + ["\nend"]
    return " ".join(words)


def _field(value: bytes, delimiter: bytes) -> bytes:
    if any(c in value for c in (delimiter, b'"', b"\n", b"\r")):
        return b'"' + value.replace(b'"', b'""') + b'"'
    return value


def _csv_record(values: list[bytes], delimiter: bytes, eol: bytes) -> bytes:
    return delimiter.join(_field(v, delimiter) for v in values) + eol


def _good_values(rng: random.Random) -> dict[str, str]:
    huge = rng.random() < 0.02
    return {"prompt": _text(rng), "response": _text(rng, huge), "id": rng.choice(["007", "1.50", "", "x", "TRUE", "-0"])}


def _write_delimited(rng: random.Random, policy: str, delimiter: bytes) -> tuple[bytes, Expected]:
    eol = b"\r\n" if rng.random() < 0.3 else b"\n"
    header = [c.encode() for c in COLUMNS]
    data = (BOM if rng.random() < 0.2 else b"") + _csv_record(header, delimiter, eol)
    expected, line = Expected(), 2
    if rng.random() < 0.04:
        return b"", expected  # empty file
    for _ in range(rng.choice([0, 1, 5, 20, 40])):
        record = _delimited_record(rng, policy, delimiter, eol, line, expected)
        data += record
        line += record.count(b"\n")
    return data, expected


def _delimited_record(rng, policy, delimiter, eol, line, expected: Expected) -> bytes:
    """One record starting at `line`, its outcome added to `expected`."""
    fault = rng.choices(["good", "fields", "utf8", "nul", "empty", "blank"], weights=[10, 1, 1, 1, 1, 1])[0]
    values = _good_values(rng)
    column = rng.choice(["prompt", "response"])
    if fault == "blank":
        return eol
    if fault == "fields":
        fields = [v.encode() for v in values.values()]
        fields = fields[:1] if rng.random() < 0.5 else [*fields, b"extra"]
        if fields[0] == b"":
            fields[0] = b"lonely"
        expected.rejects.append((line, f"expected 3 fields, got {len(fields)}"))
        return _csv_record(fields, delimiter, eol)
    encoded = {k: v.encode() for k, v in values.items()}
    if fault == "utf8":
        encoded[column] += rng.choice([b"\xff", b"caf\xe9", b"\xc3"])
        if policy == "replace":
            values[column] = encoded[column].decode("utf-8", "replace")
            expected.replaced += 1
            expected.rows.append(values)
        else:
            expected.rejects.append((line, f"invalid UTF-8 in '{column}'"))
    elif fault == "nul":
        encoded[column] += b"\x00x"
        expected.rejects.append((line, f"NUL byte in '{column}'"))
    elif fault == "empty":
        encoded[column] = rng.choice([b"", b"  ", b"\t "]) if delimiter == b"," else rng.choice([b"", b"  "])
        expected.rejects.append((line, f"'{column}' is empty"))
    else:
        expected.rows.append(values)
    return _csv_record(list(encoded.values()), delimiter, eol)


def _write_jsonl(rng: random.Random, policy: str) -> tuple[bytes, Expected]:
    eol = b"\r\n" if rng.random() < 0.3 else b"\n"
    data, expected = (BOM if rng.random() < 0.2 else b""), Expected()
    for line in range(1, rng.choice([1, 5, 20, 40]) + 1):
        fault = rng.choices(["good", "json", "list", "missing", "nul", "utf8", "blank"], weights=[10, 1, 1, 1, 1, 1, 1])[0]
        values = _good_values(rng)
        obj: dict = {**values, "id": rng.choice([values["id"], 7, 1.5, None, True, [1, "a"]])}
        values["id"] = obj["id"] if obj["id"] is None or isinstance(obj["id"], str) else json.dumps(obj["id"])
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode()
        if fault == "blank":
            text = b""
        elif fault == "json":
            text = text[:-1]
            expected.rejects.append((line, "invalid JSON"))
        elif fault == "list":
            text = b"[1, 2]"
            expected.rejects.append((line, "expected a JSON object, got list"))
        elif fault == "missing":
            del obj["response"]
            text = json.dumps(obj).encode()
            expected.rejects.append((line, "'response' is missing or null"))
        elif fault == "nul":
            obj["prompt"] += "\x00"
            text = json.dumps(obj).encode()
            expected.rejects.append((line, "NUL byte in 'prompt'"))
        elif fault == "utf8":
            text = json.dumps({**obj, "prompt": "@@"}, ensure_ascii=False).encode().replace(b"@@", b"caf\xe9")
            if policy == "replace":
                values["prompt"] = "caf\ufffd"
                expected.replaced += 1
                expected.rows.append(values)
            else:
                expected.rejects.append((line, "invalid UTF-8"))
        else:
            expected.rows.append(values)
        data += text + eol
    return data, expected


def generate(folder: Path, index: int) -> tuple[Path, str, Expected]:
    rng = random.Random(index)
    policy = "replace" if rng.random() < 0.2 else "reject"
    kind = rng.choices(["csv", "tsv", "jsonl"], weights=[6, 2, 2])[0]
    if kind == "jsonl":
        data, expected = _write_jsonl(rng, policy)
    else:
        data, expected = _write_delimited(rng, policy, b"," if kind == "csv" else b"\t")
    path = folder / f"f{index:03d}.{kind}"
    if rng.random() < 0.1:
        path, data = path.with_name(path.name + ".gz"), gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path, policy, expected


def ingest_files(paths: list[Path], out: Path, policy: str) -> dict:
    cfg = build_config({"data": {"source": [str(p) for p in paths], "max_reject_fraction": 1.0, "invalid_utf8": policy}})
    out.mkdir(parents=True)
    return ingest.run(cfg.data, cfg.row_spec, inputs={}, out=out, scratch=out / "scratch")


def read_rows(out: Path) -> list[dict]:
    shards = sorted((out / "shards").glob("*.parquet"))
    return pa.concat_tables(pq.read_table(p) for p in shards).to_pylist() if shards else []


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("battery")
    return [generate(folder, i) for i in range(FILES)]


def test_every_record_is_a_row_or_a_reject_at_its_line(battery, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "CSV_BLOCK_BYTES", BLOCK)
    outcomes = {"ok": 0, "failed": 0, "rejects": 0, "retried": 0}
    for path, policy, expected in battery:
        out = tmp_path / path.name
        try:
            stats = ingest_files([path], out, policy)
        except ValueError as error:
            # Allowed only where the generator expects it: nothing usable in the file.
            assert path.name in str(error), error
            assert not expected.rows, (path, error)
            outcomes["failed"] += 1
            continue
        rejects = read_rejects(out)
        assert stats["rows_in"] == expected.records == stats["rows_out"] + stats["rows_rejected"], path
        assert stats["rows_utf8_replaced"] == expected.replaced, path
        assert all(r["file"].endswith(path.name) and isinstance(r["line"], int) and r["reason"] for r in rejects)
        found = [(r["line"], r["reason"]) for r in rejects]
        assert [line for line, _ in found] == [line for line, _ in expected.rejects], path
        assert all(reason.startswith(want) for (_, reason), (_, want) in zip(found, expected.rejects)), (path, found)
        rows = read_rows(out)
        assert rows == [{c: row.get(c) for c in stats["columns"]} for row in expected.rows], path
        outcomes["ok"] += 1
        outcomes["rejects"] += len(rejects)
        outcomes["retried"] += any(len(r["response"]) > BLOCK for r in rows)
    # The mix really happened: most files succeed, some fail as expected, many rejects, some huge rows.
    assert outcomes["ok"] > 200 and outcomes["failed"] > 5 and outcomes["rejects"] > 300 and outcomes["retried"] > 3, outcomes


def test_the_files_together_give_the_same_rejects_as_alone(battery, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "CSV_BLOCK_BYTES", BLOCK)
    chosen = [(p, e) for p, policy, e in battery if policy == "reject" and p.suffix != ".jsonl" and p.name.endswith("csv")]
    chosen = [(p, e) for p, e in chosen if e.rows][:60]

    stats = ingest_files([p for p, _ in chosen], tmp_path / "together", "reject")

    rejects = read_rejects(tmp_path / "together")
    assert [(Path(r["file"]).name, r["line"]) for r in rejects] == [(p.name, line) for p, e in chosen for line, _ in e.rejects]
    assert stats["rows_out"] == sum(len(e.rows) for _, e in chosen)
    assert stats["files"] == len(chosen) and stats["shards"] == len(chosen)
