"""Ingest: real files in tmp_path, through `ingest.run` and once through the stage runner."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ingest, stages
from pipeline.config import build_config


def csv_text(rows: list[list[str]], header=("prompt", "response")) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def run_ingest(tmp_path: Path, source, **data) -> tuple[dict, Path]:
    cfg = build_config({"data": {"source": source, **data}})
    out = tmp_path / "out"
    out.mkdir(parents=True)
    stats = ingest.run(cfg.data, inputs={}, out=out, scratch=tmp_path / "scratch")
    return stats, out


def read_output(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet")))


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_malformed_csv_rows_are_rejected_with_their_line(tmp_path):
    good = [[f"question {i}", f"answer {i}, with a comma"] for i in range(997)]
    lines = csv_text(good).splitlines(keepends=True)
    # Records (= lines here, the header is line 1) 101, 501 and 1001 get the wrong field count.
    bad = {100: "only one field\n", 500: "one,two,three\n", 1000: 'a,"b",c,d\n'}
    for index in sorted(bad):
        lines.insert(index, bad[index])
    path = tmp_path / "data.csv"
    path.write_text("".join(lines))

    stats, out = run_ingest(tmp_path, str(path))

    assert stats["rows_in"] == 1000
    assert stats["rows_out"] == 997
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"]
    assert (stats["files"], stats["shards"], stats["bytes_in"]) == (1, 1, path.stat().st_size)
    rejects = read_rejects(out)
    assert [r["line"] for r in rejects] == [101, 501, 1001]
    assert [r["raw"] for r in rejects] == ["only one field", "one,two,three", 'a,"b",c,d']
    assert all(r["file"].endswith("data.csv") and "expected 2 fields" in r["reason"] for r in rejects)
    assert read_output(out).to_pylist() == [{"prompt": p, "response": r} for p, r in good]


def test_quoted_newlines_commas_and_quotes_survive(tmp_path):
    rows = [
        ["line one\nline two", 'She said "hi", then left.\nBye.'],
        ["007", "1.5e3"],  # must stay text, not become numbers
        ["tabs\tand, commas", "ünïcödé ✓"],
    ]
    path = tmp_path / "data.csv"
    path.write_text(csv_text([[*r, f"id{i}"] for i, r in enumerate(rows)], header=("prompt", "response", "id")))

    stats, out = run_ingest(tmp_path, str(path))

    table = read_output(out)
    assert stats["rows_out"] == 3 and stats["rows_rejected"] == 0
    assert table.schema == pa.schema([("prompt", pa.string()), ("response", pa.string()), ("id", pa.string())])
    assert table.to_pylist() == [{"prompt": p, "response": r, "id": f"id{i}"} for i, (p, r) in enumerate(rows)]
    assert (out / "rejects.jsonl").read_text() == ""


def test_missing_required_column_lists_the_columns_found(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["q", "a"]], header=("question", "answer")))

    with pytest.raises(ValueError, match=r"\['prompt', 'response'\] not found.*\['question', 'answer'\]"):
        run_ingest(tmp_path, str(path))
    assert list((tmp_path / "out").iterdir()) == []  # raised before writing anything

    stats, out = run_ingest(tmp_path / "renamed", str(path), prompt_column="question", response_column="answer")
    assert read_output(out).to_pylist() == [{"question": "q", "answer": "a"}]


def test_empty_values_are_rejected_naming_the_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(
        "prompt,response\n"
        "fine,fine\n"
        "bad,row,here\n"           # line 3: wrong field count
        '"multi\nline",ok\n'       # record 4, lines 4-5
        ",no prompt\n"             # record 5
        "no response,   \n"        # record 6: whitespace only
        "fine again,yes\n"
    )

    stats, out = run_ingest(tmp_path, str(path), max_reject_fraction=0.5)

    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (6, 3, 3)
    rejects = read_rejects(out)
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (3, "expected 2 fields, got 3"),
        (5, "'prompt' is empty"),
        (6, "'response' is empty"),
    ]
    assert json.loads(rejects[1]["raw"]) == {"prompt": "", "response": "no prompt"}


def test_invalid_utf8_rejects_the_row_not_the_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"prompt,response\nfine,ok\nlatin-1,caf\xe9\nalso fine,ok\n")

    stats, out = run_ingest(tmp_path, str(path), max_reject_fraction=0.5)

    assert read_output(out).column("prompt").to_pylist() == ["fine", "also fine"]
    [reject] = read_rejects(out)
    assert (reject["line"], reject["reason"], stats["rows_in"]) == (3, "invalid UTF-8 in 'response'", 3)


def test_jsonl_bad_lines_are_rejected(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        {"prompt": "p1", "response": "r1", "topic": "a"},
        "{not json",
        {"prompt": "p2", "response": "r2"},
        "",  # blank lines are not rows
        [1, 2],
        {"prompt": "p3"},
        {"prompt": 42, "response": {"nested": True}, "topic": "b"},
    ]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")

    stats, out = run_ingest(tmp_path, str(path), max_reject_fraction=0.5)

    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (6, 3, 3)
    assert read_output(out).to_pylist() == [
        {"prompt": "p1", "response": "r1", "topic": "a"},
        {"prompt": "p2", "response": "r2", "topic": None},
        {"prompt": "42", "response": '{"nested": true}', "topic": "b"},
    ]
    rejects = read_rejects(out)
    assert [r["line"] for r in rejects] == [2, 5, 6]
    assert rejects[0]["reason"].startswith("invalid JSON") and rejects[0]["raw"] == "{not json"
    assert rejects[1]["reason"] == "expected a JSON object, got list"
    assert rejects[2]["reason"] == "'response' is missing or null"


def test_parquet_input_is_read_as_text(tmp_path):
    path = tmp_path / "data.parquet"
    table = pa.table({"id": [1, 2, 3], "prompt": ["a", None, "c"], "response": ["x", "y", "z"]})
    pq.write_table(table, path, row_group_size=2)

    stats, out = run_ingest(tmp_path, str(path), max_reject_fraction=0.5)

    assert (stats["rows_out"], stats["rows_rejected"]) == (2, 1)
    assert read_output(out).to_pylist() == [
        {"id": "1", "prompt": "a", "response": "x"},
        {"id": "3", "prompt": "c", "response": "z"},
    ]
    assert read_rejects(out)[0]["line"] == 2


def test_gzip_tsv_and_a_glob_of_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "b.csv").write_text(csv_text([["b1", "rb1"]]))
    (data / "a.csv").write_text(csv_text([["a1", "ra1"], ["a2", "ra2"]]))
    with gzip.open(data / "c.tsv.gz", "wt") as f:
        f.write("prompt\tresponse\nc1\trc, 1\n")

    stats, out = run_ingest(tmp_path, [str(data / "*.csv"), str(data / "c.tsv.gz")])

    assert stats["files"] == 3
    assert read_output(out).column("prompt").to_pylist() == ["a1", "a2", "b1", "c1"]  # sorted within a glob


def test_no_match_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.csv")
    with pytest.raises(FileNotFoundError, match=r"no file matches '.*nothing/\*\.csv'"):
        run_ingest(tmp_path, pattern)


def test_too_many_rejects_fail_with_the_first_reasons(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["p", "r"]] * 7 + [["", "r"]] * 3))

    with pytest.raises(ValueError, match=r"3 of 10 rows rejected") as error:
        run_ingest(tmp_path, str(path), max_reject_fraction=0.2)
    assert "rejects.jsonl" in str(error.value) and "data.csv:9: 'prompt' is empty" in str(error.value)

    stats, _ = run_ingest(tmp_path / "lenient", str(path), max_reject_fraction=0.3)
    assert stats["rows_rejected"] == 3


def test_same_input_gives_byte_identical_shards(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([[f"q{i}", f"a{i}"] for i in range(1000)]))

    stats1, out1 = run_ingest(tmp_path / "one", str(path), shard_rows=300)
    stats2, out2 = run_ingest(tmp_path / "two", str(path), shard_rows=300)

    shards1, shards2 = sorted((out1 / "shards").iterdir()), sorted((out2 / "shards").iterdir())
    assert [p.name for p in shards1] == [f"part-0000{i}.parquet" for i in range(4)]
    assert [pq.ParquetFile(p).metadata.num_rows for p in shards1] == [300, 300, 300, 100]
    assert [p.read_bytes() for p in shards1] == [p.read_bytes() for p in shards2]
    assert stats1 == stats2 and stats1["shards"] == 4


def test_content_fingerprint_follows_the_bytes(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["hello", "world"]]))
    data = build_config({"data": {"source": str(path)}}).data

    before = ingest.content_fingerprint(data)
    path.write_text(csv_text([["hellO", "world"]]))  # same size, one byte differs
    after = ingest.content_fingerprint(data)

    assert before[0]["bytes"] == after[0]["bytes"] == path.stat().st_size
    assert before[0]["sha256"] != after[0]["sha256"]
    assert before[0]["path"] == after[0]["path"]


def test_fingerprint_hashes_an_unchanged_file_once(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["hello", "world"]]))
    old = time.time() - 60
    os.utime(path, (old, old))  # a freshly written file is never cached (racy mtime)
    calls = []
    monkeypatch.setattr(ingest, "sha256_file", lambda *a: calls.append(a) or "digest")
    data = build_config({"data": {"source": str(path)}}).data

    assert ingest.content_fingerprint(data) == ingest.content_fingerprint(data)
    assert len(calls) == 1


def test_runner_commits_a_manifest_with_the_stats(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["q", "a"], ["", "a"]]))
    cfg = build_config({"data": {"source": str(path), "max_reject_fraction": 0.5}})

    result = stages.materialize("ingest", cfg, {}, workdir=str(tmp_path / "runs"), log=lambda _: None)

    manifest = json.loads((Path(result.output) / "manifest.json").read_text())
    assert result.status == "ran"
    assert manifest["stats"]["rows_out"] == 1 and manifest["stats"]["rows_rejected"] == 1
    assert set(manifest["files"]) == {"rejects.jsonl", "shards/part-00000.parquet"}
    again = stages.materialize("ingest", cfg, {}, workdir=str(tmp_path / "runs"), log=lambda _: None)
    assert (again.status, again.fingerprint) == ("cached", result.fingerprint)


@pytest.mark.integration
def test_s3_glob_through_moto(tmp_path, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.pipe(f"{s3_bucket}/raw/a.csv", b'prompt,response\nq1,"multi\nline"\nbad\n')
    fs.pipe(f"{s3_bucket}/raw/b.csv", b"prompt,response\nq2,r2\n")
    fs.pipe(f"{s3_bucket}/raw/c.txt", b"not matched by the glob\n")

    source = f"s3://{s3_bucket}/raw/*.csv"
    stats, out = run_ingest(tmp_path, source, max_reject_fraction=0.5)
    fingerprint = ingest.content_fingerprint(build_config({"data": {"source": source}}).data)

    assert (stats["files"], stats["rows_out"], stats["rows_rejected"]) == (2, 2, 1)
    assert read_output(out).to_pylist() == [{"prompt": "q1", "response": "multi\nline"}, {"prompt": "q2", "response": "r2"}]
    assert read_rejects(out) == [{"file": f"s3://{s3_bucket}/raw/a.csv", "line": 3, "reason": "expected 2 fields, got 1", "raw": "bad"}]
    assert [entry["path"] for entry in fingerprint] == [f"s3://{s3_bucket}/raw/a.csv", f"s3://{s3_bucket}/raw/b.csv"]
