"""Ingest's columns, formats and sources, real files in tmp_path: required columns and renames,
JSONL keys, Parquet of any type, compressed files and globs, Hugging Face datasets, S3 via moto."""

from __future__ import annotations

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tiny import csv_text, make_config, read_output, read_rejects, run_ingest, shard_bytes

from pipeline.data import ingest, sources


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
