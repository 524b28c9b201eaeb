"""Ingest: real files in tmp_path, through `ingest.run` and once through the stage runner."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline import stages
from pipeline.data import ingest, sources
from pipeline.config import build_config


def csv_text(rows: list[list[str]], header=("prompt", "response")) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def make_config(source, raw: dict | None = None, **data):
    return build_config({**(raw or {}), "data": {"source": source, **data}})


def run_ingest(tmp_path: Path, source, raw: dict | None = None, **data) -> tuple[dict, Path]:
    cfg = make_config(source, raw, **data)
    out = tmp_path / "out"
    out.mkdir(parents=True)
    stats = ingest.run(cfg.data, cfg.row_spec, inputs={}, out=out, scratch=tmp_path / "scratch")
    return stats, out


def read_output(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "shards").glob("*.parquet")))


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def shard_bytes(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((out / "shards").iterdir())]


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


# ---------------------------------------------------------------- columns


def test_missing_required_column_lists_the_columns_found(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["q", "a"]], header=("question", "answer")))

    with pytest.raises(ValueError, match=r"\['prompt', 'response'\] not found; it has columns \['question', 'answer'\]"):
        run_ingest(tmp_path, str(path))
    assert list((tmp_path / "out").iterdir()) == []  # raised before writing anything

    stats, out = run_ingest(tmp_path / "columns", str(path), prompt_column="question", response_column="answer")
    assert read_output(out).to_pylist() == [{"question": "q", "answer": "a"}]


def test_rename_applies_to_every_source_and_names_unknown_columns(tmp_path):
    (tmp_path / "a.csv").write_text(csv_text([["q1", "a1"]], header=("question", "answer")))
    (tmp_path / "b.jsonl").write_text(json.dumps({"question": "q2", "answer": "a2", "id": 7}) + "\n")
    rename = {"question": "prompt", "answer": "response"}

    stats, out = run_ingest(tmp_path, [str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")], rename=rename)

    assert stats["columns"] == ["prompt", "response", "id"]
    assert read_output(out).to_pylist() == [
        {"prompt": "q1", "response": "a1", "id": None},
        {"prompt": "q2", "response": "a2", "id": "7"},
    ]
    with pytest.raises(ingest.IngestError, match=r"data.rename: no input has column\(s\) \['questoin'\]"):
        run_ingest(tmp_path / "typo", str(tmp_path / "a.csv"), rename={"questoin": "prompt", "answer": "response"})


def test_the_task_decides_the_required_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["great", "pos"], ["", "neg"], ["meh", ""]], header=("text", "label")))
    stats, out = run_ingest(tmp_path, str(path), {"task": "classification"}, max_reject_fraction=0.7)
    assert (stats["rows_out"], [r["reason"] for r in read_rejects(out)]) == (1, ["'text' is empty", "'label' is empty"])

    # instruction: `input` is optional, may be empty or absent, and is always an output column.
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"instruction": "i1", "output": "o1"},
                                                         {"instruction": "i2", "input": "", "output": "o2"}]))
    stats, out = run_ingest(tmp_path / "instruction", str(path), {"preprocess": {"template": "instruction"}})
    assert stats["columns"] == ["instruction", "output", "input"]
    assert read_output(out).column("input").to_pylist() == [None, ""]


# ---------------------------------------------------------------- other formats and sources


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


def test_jsonl_keys_after_the_first_objects_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_JSONL_KEY_LINES", 2)  # the columns come from the first 2 lines
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2", "a": 1}, {"prompt": "p3", "response": "r3", "late": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows))

    stats, out = run_ingest(tmp_path, str(path))

    assert (stats["columns"], stats["columns_ignored"], stats["rows_out"]) == (["prompt", "response", "a"], ["late"], 3)


def test_parquet_columns_of_any_type_are_read_as_text(tmp_path):
    path = tmp_path / "data.parquet"
    table = pa.table({
        "id": [1, 2, 3, 4],
        "prompt": ["a", None, "c", "d"],
        "response": pa.array([b"x", b"y", b"caf\xe9", b"w"], pa.binary()),
        "meta": [{"k": [1, 2]}, None, {"k": []}, {"k": [3]}],
        "flag": [True, False, None, True],
    })
    pq.write_table(table, path, row_group_size=2)

    stats, out = run_ingest(tmp_path, str(path), max_reject_fraction=0.5)

    assert (stats["rows_out"], stats["rows_rejected"]) == (2, 2)
    assert read_output(out).to_pylist() == [
        {"id": "1", "prompt": "a", "response": "x", "meta": '{"k": [1, 2]}', "flag": "true"},
        {"id": "4", "prompt": "d", "response": "w", "meta": '{"k": [3]}', "flag": "true"},
    ]
    assert [(r["line"], r["reason"]) for r in read_rejects(out)] == [
        (2, "'prompt' is missing or null"), (3, "invalid UTF-8 in 'response'")
    ]


def test_compressed_inputs_and_a_glob_of_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "b.csv").write_text(csv_text([["b1", "rb1"]]))
    (data / "a.csv").write_text(csv_text([["a1", "ra1"], ["a2", "ra2"]]))
    with gzip.open(data / "c.tsv.gz", "wt") as f:
        f.write("prompt\tresponse\nc1\trc, 1\n")
    (data / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"prompt": "d1", "response": "rd1"}\n'))
    (data / "e.csv.bz2").write_bytes(bz2.compress(csv_text([["e1", "multi\nline"], ["", "x"]]).encode()))

    stats, out = run_ingest(tmp_path, [str(data / "*.csv"), str(data / "c.tsv.gz"), str(data / "*.*.*")], max_reject_fraction=0.5)

    assert stats["files"] == 5  # c.tsv.gz is named twice, read once
    assert read_output(out).column("prompt").to_pylist() == ["a1", "a2", "b1", "c1", "d1", "e1"]
    [reject] = read_rejects(out)
    assert (reject["file"].endswith("data/e.csv.bz2"), reject["line"]) == (True, 4)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return datasets


def test_a_save_to_disk_folder_is_read_by_split(tmp_path, hf_cache):
    datasets = hf_cache
    train = datasets.Dataset.from_dict({"prompt": ["p1", "", "p3"], "response": ["r1", "r2", "r3"], "n": [1, 2, 3]})
    train.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": train.select([0]), "test": train.select([2])}).save_to_disk(str(tmp_path / "dict"))

    stats, out = run_ingest(tmp_path / "a", str(tmp_path / "single"), max_reject_fraction=0.5)
    assert read_output(out).to_pylist() == [{"prompt": "p1", "response": "r1", "n": "1"},
                                            {"prompt": "p3", "response": "r3", "n": "3"}]
    assert read_rejects(out)[0]["line"] == 2 and read_rejects(out)[0]["file"].endswith("single")

    stats, out = run_ingest(tmp_path / "b", str(tmp_path / "dict"), hf_split="test")
    assert read_output(out).column("prompt").to_pylist() == ["p3"]
    with pytest.raises(ingest.IngestError, match=r"no split 'validation' \(it has \['test', 'train'\]\)"):
        run_ingest(tmp_path / "c", str(tmp_path / "dict"), hf_split="validation")

    data = make_config(str(tmp_path / "dict"), hf_split="test").data
    before = ingest.content_fingerprint(data, None)
    datasets.DatasetDict({"train": train.select([0]), "test": train.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert ingest.content_fingerprint(data, None) != before


def test_hf_name_loads_a_local_dataset_folder(tmp_path, hf_cache):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(3)))
    (folder / "test.jsonl").write_text(json.dumps({"prompt": "held out", "response": "r"}))
    source = f"hf:{folder}"

    stats, out = run_ingest(tmp_path, source, rename={"prompt": "question"}, prompt_column="question")

    assert (stats["files"], stats["rows_out"]) == (1, 3)
    assert read_output(out).to_pylist() == [{"question": f"p{i}", "response": f"r{i}"} for i in range(3)]
    [entry] = ingest.content_fingerprint(make_config(source).data, None)
    assert entry["path"] == source and entry["split"] == "train" and entry["files"][0]["bytes"] > 0
    with pytest.raises(ingest.IngestError, match=r"hf:.*my_dataset: .*validation"):
        run_ingest(tmp_path / "no_split", source, hf_split="validation")


# ---------------------------------------------------------------- the stage as a whole


def test_reading_text_never_imports_pandas(tmp_path):
    # pyarrow's Python <-> arrow conversions import pandas on first use: a third of a second per
    # run, as long as ingesting a 300 MB file. Rejects of every kind take those paths.
    (tmp_path / "a.csv").write_bytes(b'prompt,response\nq,a\nbad\n,x\ny,caf\xe9\nz,nul\x00\n\n"m\nl",r\n')
    (tmp_path / "b.jsonl").write_text('{"prompt": "q", "response": 1}\n{"prompt": ""}\n[1]\n')
    pq.write_table(pa.table({"prompt": ["q", None], "response": pa.array([b"a", b"\xff"]), "n": [[1], [2]]}),
                   tmp_path / "c.parquet")
    code = (
        "import sys; from pathlib import Path; from pipeline.data import ingest; from pipeline.config import build_config\n"
        f"cfg = build_config({{'data': {{'source': {str(tmp_path / '*.*')!r}, 'max_reject_fraction': 1.0}}}})\n"
        f"stats = ingest.run(cfg.data, cfg.row_spec, inputs={{}}, out=Path({str(tmp_path / 'out')!r}), scratch=Path('.'))\n"
        "print(stats['rows_out'], stats['rows_rejected'], 'pandas' in sys.modules)\n"
    )
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "7", "False"]


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
    path.write_text(csv_text([[f"q{i}", f"a{i}\nline two"] for i in range(1000)] + [["", "x"]]))

    stats1, out1 = run_ingest(tmp_path / "one", str(path), shard_rows=300)
    stats2, out2 = run_ingest(tmp_path / "two", str(path), shard_rows=300)

    shards1 = sorted((out1 / "shards").iterdir())
    assert [p.name for p in shards1] == [f"part-00000-0000{i}.parquet" for i in range(4)]
    assert [pq.ParquetFile(p).metadata.num_rows for p in shards1] == [300, 300, 300, 100]
    assert shard_bytes(out1) == shard_bytes(out2)
    assert (out1 / "rejects.jsonl").read_bytes() == (out2 / "rejects.jsonl").read_bytes()
    assert stats1 == stats2 and stats1["shards"] == 4


def test_content_fingerprint_follows_the_bytes(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["hello", "world"]]))
    cfg = make_config(str(path))

    before = ingest.content_fingerprint(cfg.data, cfg.row_spec)
    path.write_text(csv_text([["hellO", "world"]]))  # same size, one byte differs
    after = ingest.content_fingerprint(cfg.data, cfg.row_spec)

    assert before[0]["bytes"] == after[0]["bytes"] == path.stat().st_size
    assert before[0]["sha256"] != after[0]["sha256"]
    assert before[0]["path"] == after[0]["path"]


def test_fingerprint_hashes_an_unchanged_file_once(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["hello", "world"]]))
    old = time.time() - 60
    os.utime(path, (old, old))  # a freshly written file is never cached (racy mtime)
    calls = []
    monkeypatch.setattr(sources, "sha256_file", lambda *a: calls.append(a) or "digest")
    cfg = make_config(str(path))

    assert ingest.content_fingerprint(cfg.data, cfg.row_spec) == ingest.content_fingerprint(cfg.data, cfg.row_spec)
    assert len(calls) == 1


def test_runner_commits_a_manifest_with_the_stats(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(csv_text([["q", "a"], ["", "a"]]))
    cfg = make_config(str(path), max_reject_fraction=0.5)

    result = stages.materialize("ingest", cfg, {}, workdir=str(tmp_path / "runs"), log=lambda _: None)

    manifest = json.loads((Path(result.output) / "manifest.json").read_text())
    assert result.status == "ran"
    assert manifest["stats"]["rows_out"] == 1 and manifest["stats"]["rows_rejected"] == 1
    assert set(manifest["files"]) == {"rejects.jsonl", "shards/part-00000-00000.parquet"}
    again = stages.materialize("ingest", cfg, {}, workdir=str(tmp_path / "runs"), log=lambda _: None)
    assert (again.status, again.fingerprint) == ("cached", result.fingerprint)


@pytest.mark.integration
def test_s3_glob_through_moto_matches_the_local_read(tmp_path, s3_bucket):
    import fsspec

    files = {
        "a.csv": b'prompt,response\nq1,"multi\nline"\nbad\n',
        "b.csv.gz": gzip.compress(b"prompt,response\nq2,r2\n", mtime=0),
        "c.txt": b"not matched by the glob\n",
    }
    fs = fsspec.filesystem("s3")
    local = tmp_path / "local"
    local.mkdir()
    for name, data in files.items():
        fs.pipe(f"{s3_bucket}/raw/{name}", data)
        (local / name).write_bytes(data)

    source = f"s3://{s3_bucket}/raw/*.csv*"
    stats, out = run_ingest(tmp_path / "s3", source, max_reject_fraction=0.5)
    local_stats, local_out = run_ingest(tmp_path / "local_run", str(local / "*.csv*"), max_reject_fraction=0.5)
    fingerprint = ingest.content_fingerprint(make_config(source).data, None)

    assert (stats["files"], stats["rows_out"], stats["rows_rejected"]) == (2, 2, 1)
    assert read_output(out).to_pylist() == [{"prompt": "q1", "response": "multi\nline"}, {"prompt": "q2", "response": "r2"}]
    assert read_rejects(out) == [{"file": f"s3://{s3_bucket}/raw/a.csv", "line": 4, "reason": "expected 2 fields, got 1", "raw": "bad"}]
    assert shard_bytes(out) == shard_bytes(local_out)
    assert stats == local_stats
    assert [entry["path"] for entry in fingerprint] == [f"s3://{s3_bucket}/raw/a.csv", f"s3://{s3_bucket}/raw/b.csv.gz"]


@pytest.mark.integration
def test_s3_endpoint_from_the_config_wins_over_the_environment(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    import fsspec
    import s3fs

    fsspec.filesystem("s3").pipe(f"{s3_bucket}/a.csv", b"prompt,response\nq,r\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    s3fs.S3FileSystem.clear_instance_cache()

    stats, out = run_ingest(tmp_path, f"s3://{s3_bucket}/a.csv", s3_endpoint_url=s3_endpoint)

    assert read_output(out).to_pylist() == [{"prompt": "q", "response": "r"}]
