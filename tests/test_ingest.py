"""Ingest on bad input, real files in tmp_path: each malformed record is rejected at its physical
line with its reason, and the faults that cannot be skipped fail the stage naming the file.

The seeded battery of 300 malformed files is in test_ingest_battery.py; columns, formats and
sources in test_ingest_sources.py; the output's bytes and fingerprints in test_ingest_output.py.
"""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pytest
from tiny import csv_text, read_output, read_rejects, run_ingest, shard_bytes

from pipeline.data import ingest


# ---------------------------------------------------------------- CSV faults


def test_malformed_csv_rows_are_rejected_with_their_line(tmp_path):
    good = [[f"question {i}", f"answer {i}, with a comma"] for i in range(997)]
    lines = csv_text(good).splitlines(keepends=True)
    # Lines 101, 501 and 1001 (the header is line 1) get the wrong field count.
    bad = {100: "only one field\n", 500: "one,two,three\n", 1000: 'a,"b",c,d\n'}
    for index in sorted(bad):
        lines.insert(index, bad[index])
    path = tmp_path / "data.csv"
    path.write_text("".join(lines))

    stats, out = run_ingest(tmp_path, str(path))

    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (1000, 997, 3)
    assert (stats["files"], stats["shards"], stats["bytes_in"]) == (1, 1, path.stat().st_size)
    rejects = read_rejects(out)
    assert [r["line"] for r in rejects] == [101, 501, 1001]
    assert [r["raw"] for r in rejects] == ["only one field", "one,two,three", 'a,"b",c,d']
    assert all(r["file"].endswith("data.csv") and "expected 2 fields" in r["reason"] for r in rejects)
    assert read_output(out).to_pylist() == [{"prompt": p, "response": r} for p, r in good]


def test_reject_lines_are_physical_lines_across_blocks(tmp_path, monkeypatch):
    # Small blocks: the line count must carry from batch to batch, through multi-line values,
    # blank lines, CRLF and malformed records that pyarrow reports from inside a block. The
    # malformed ones come late, so that earlier batches take the per-batch (not per-row) count.
    monkeypatch.setattr(ingest, "CSV_BLOCK_BYTES", 256)
    text, expected, line, blank = "prompt,response\r\n", [], 2, 0
    for i in range(120):
        if i % 7 == 3:
            text += f'"multi\r\nline {i}","and\nthree\nlines"\r\n'
            line += 4
        elif i % 11 == 5 and i > 80:
            text += f"bad {i},x,y\r\n"
            expected.append((line, "expected 2 fields, got 3"))
            line += 1
        elif i % 13 == 6:
            text += f'"two\nlines {i}",\r\n'  # empty response
            expected.append((line, "'response' is empty"))
            line += 2
        elif i % 17 == 8:
            text += "\r\n"  # a blank line: not a record, but a line
            line += 1
            blank += 1
        else:
            text += f"q{i},a{i}\r\n"
            line += 1
    path = tmp_path / "data.csv"
    path.write_bytes(text.encode())

    stats, out = run_ingest(tmp_path, str(path), max_reject_fraction=0.5)

    assert [(r["line"], r["reason"]) for r in read_rejects(out)] == expected
    assert stats["blank_lines"] == blank > 0
    assert stats["rows_in"] == 120 - blank == stats["rows_out"] + len(expected)
    assert read_output(out).column("prompt").to_pylist()[3] == "multi\r\nline 3"


def test_quoted_newlines_commas_quotes_and_mixed_types_stay_text(tmp_path):
    rows = [
        ["line one\nline two", 'She said "hi", then left.\nBye.'],
        ["007", "1.5e3"],  # must stay text, not become numbers
        ["tabs\tand, commas", "ünïcödé ✓"],
        ["true", "2024-01-01"],
    ]
    path = tmp_path / "data.csv"
    path.write_text(csv_text([[*r, f"{i:03d}" if i else "x"] for i, r in enumerate(rows)], header=("prompt", "response", "id")))

    stats, out = run_ingest(tmp_path, str(path))

    table = read_output(out)
    assert stats["rows_out"] == 4 and stats["rows_rejected"] == 0
    assert table.schema == pa.schema([("prompt", pa.string()), ("response", pa.string()), ("id", pa.string())])
    assert table.column("id").to_pylist() == ["x", "001", "002", "003"]
    assert [(r["prompt"], r["response"]) for r in table.to_pylist()] == [tuple(r) for r in rows]
    assert (out / "rejects.jsonl").read_text() == ""


def test_blank_required_values_and_nul_bytes_are_rejected_naming_the_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(
        "prompt,response\n"
        "fine,fine\n"
        "bad,row,here\n"           # line 3: wrong field count
        '"multi\nline",ok\n'       # lines 4-5
        ",no prompt\n"             # line 6
        "no response,   \n"        # line 7: whitespace only
        "nul \x00 inside,ok\n"     # line 8
        "\n"                       # line 9: blank, not a row
        "fine again,yes\n"
        "\u00a0\u3000,unicode spaces\n"  # line 11: whitespace too
    )

    stats, out = run_ingest(tmp_path, str(path), max_reject_fraction=0.7)

    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"], stats["blank_lines"]) == (8, 3, 5, 1)
    rejects = read_rejects(out)
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (3, "expected 2 fields, got 3"),
        (6, "'prompt' is empty"),
        (7, "'response' is empty"),
        (8, "NUL byte in 'prompt'"),
        (11, "'prompt' is empty"),
    ]
    assert json.loads(rejects[1]["raw"]) == {"prompt": "", "response": "no prompt"}


def test_invalid_utf8_is_rejected_or_replaced_by_policy(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"prompt,response\nfine,ok\n\"two\nlines\",ok\nlatin-1,caf\xe9\nalso fine,ok\n")

    stats, out = run_ingest(tmp_path / "reject", str(path), max_reject_fraction=0.5)
    assert read_output(out).column("prompt").to_pylist() == ["fine", "two\nlines", "also fine"]
    [reject] = read_rejects(out)
    assert (reject["line"], reject["reason"], stats["rows_in"]) == (5, "invalid UTF-8 in 'response'", 4)
    assert json.loads(reject["raw"]) == {"prompt": "latin-1", "response": "caf\ufffd"}

    stats, out = run_ingest(tmp_path / "replace", str(path), invalid_utf8="replace")
    assert read_output(out).column("response").to_pylist() == ["ok", "ok", "caf\ufffd", "ok"]
    assert (stats["rows_rejected"], stats["rows_utf8_replaced"]) == (0, 1)


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbfprompt,response\r\nq1,a1\r\n")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "q2", "response": "a2"}\n')

    stats, out = run_ingest(tmp_path, [str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")])

    assert stats["columns"] == ["prompt", "response"]
    assert read_output(out).to_pylist() == [{"prompt": "q1", "response": "a1"}, {"prompt": "q2", "response": "a2"}]


def test_empty_and_header_only_files_give_no_rows_and_are_counted(tmp_path):
    (tmp_path / "a_empty.csv").write_bytes(b"")
    (tmp_path / "b_header.csv").write_text("prompt,response\n")
    (tmp_path / "c_header_no_newline.csv").write_text("prompt,response")
    (tmp_path / "d_data.csv").write_text(csv_text([["q", "a"]]))
    (tmp_path / "e_blank.jsonl").write_text("\n\n")

    stats, out = run_ingest(tmp_path, str(tmp_path / "*_*.*"))

    assert (stats["files"], stats["empty_files"], stats["rows_in"], stats["rows_out"]) == (5, 4, 1, 1)
    assert read_output(out).to_pylist() == [{"prompt": "q", "response": "a"}]

    for name in ("d_data.csv", "e_blank.jsonl"):
        (tmp_path / name).unlink()
    with pytest.raises(ingest.IngestError, match=r"every input is empty.*a_empty\.csv.*b_header\.csv"):
        run_ingest(tmp_path / "all_empty", str(tmp_path / "*_*.*"))


def test_a_record_larger_than_the_block_is_read_again_with_a_bigger_block(tmp_path, monkeypatch):
    huge = "x" * 5000 + "\n" + "y" * 5000
    rows = [[f"q{i}", f"a{i}"] for i in range(200)]
    rows[150] = ["huge", huge]
    text = csv_text(rows).replace("q20,a20\n", "q20,a20,extra\n")  # a reject before the huge row
    (tmp_path / "a.csv").write_text(csv_text([["first", "file"]]))
    (tmp_path / "b.csv").write_text(text)
    source = str(tmp_path / "*.csv")
    stats_big, out_big = run_ingest(tmp_path / "big", source, max_reject_fraction=0.5)

    monkeypatch.setattr(ingest, "CSV_BLOCK_BYTES", 1024)
    stats, out = run_ingest(tmp_path / "small", source, max_reject_fraction=0.5)

    assert stats == stats_big and stats["rows_in"] == 201
    assert read_rejects(out) == read_rejects(out_big) == [
        {"file": read_rejects(out)[0]["file"], "line": 22, "reason": "expected 2 fields, got 3", "raw": "q20,a20,extra"}
    ]
    assert shard_bytes(out) == shard_bytes(out_big)
    assert read_output(out).column("response").to_pylist()[150] == huge

    monkeypatch.setattr(ingest, "_MAX_BLOCK_BYTES", 4096)  # 1024, then 4096: still too small
    with pytest.raises(ingest.IngestError, match=r"b\.csv, near line 1\d\d: a record larger than"):
        run_ingest(tmp_path / "too_big", source, max_reject_fraction=0.5)


def test_a_fault_that_cannot_be_skipped_names_the_file(tmp_path):
    path = tmp_path / "broken.csv.gz"
    whole = gzip.compress(csv_text([[os.urandom(8).hex(), "a"] for _ in range(1000)]).encode())
    path.write_bytes(whole[: len(whole) // 2])  # truncated: the stream ends mid-file

    with pytest.raises(ingest.IngestError, match=r"broken\.csv\.gz"):
        run_ingest(tmp_path, str(path))

    blank_first = tmp_path / "blank_first.csv"
    blank_first.write_text("\nprompt,response\nq,a\n")
    with pytest.raises(ingest.IngestError, match=r"blank_first\.csv: line 1 is blank"):
        run_ingest(tmp_path / "two", str(blank_first))


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
        {"prompt": "p4", "response": "nul\u0000"},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    path.write_bytes(text.encode() + b'{"prompt": "caf\xe9", "response": "r5"}\n')

    stats, out = run_ingest(tmp_path, str(path), max_reject_fraction=0.7)

    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (8, 3, 5)
    assert read_output(out).to_pylist() == [
        {"prompt": "p1", "response": "r1", "topic": "a"},
        {"prompt": "p2", "response": "r2", "topic": None},
        {"prompt": "42", "response": '{"nested": true}', "topic": "b"},
    ]
    rejects = read_rejects(out)
    assert [r["line"] for r in rejects] == [2, 5, 6, 8, 9]
    assert rejects[0]["reason"].startswith("invalid JSON") and rejects[0]["raw"] == "{not json"
    assert [r["reason"] for r in rejects[1:]] == [
        "expected a JSON object, got list", "'response' is missing or null", "NUL byte in 'response'", "invalid UTF-8"
    ]


def test_too_many_rejects_fail_with_the_first_reasons(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["p", "r"]] * 7 + [["", "r"]] * 3))

    with pytest.raises(ValueError, match=r"3 of 10 rows rejected") as error:
        run_ingest(tmp_path, str(path), max_reject_fraction=0.2)
    assert "rejects.jsonl" in str(error.value) and "data.csv:9: 'prompt' is empty" in str(error.value)

    stats, _ = run_ingest(tmp_path / "lenient", str(path), max_reject_fraction=0.3)
    assert stats["rows_rejected"] == 3
