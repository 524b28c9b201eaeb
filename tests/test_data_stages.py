"""The four data stages together: a real corpus nobody here wrote, and S3 in and out.

These go through the stage runner (`stages.materialize`), exactly as `tunepipe run` does.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from examples import docstring_corpus
from pipeline import artifacts, stages
from pipeline.config import build_config

DATA_STAGES = ("ingest", "sample", "preprocess", "tokenize")


def quiet(_: str) -> None:
    pass


def run_data_stages(cfg, workdir: str) -> dict[str, stages.StageResult]:
    results: dict[str, stages.StageResult] = {}
    for name in DATA_STAGES:
        parents = {p: results[p].artifact for p in stages.STAGES[name].parents}
        results[name] = stages.materialize(name, cfg, parents, workdir, log=quiet)
    return results


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Counter]:
    """Python's stdlib docstrings labelled by package, written as CSV with multi-line quoted text."""
    path = tmp_path_factory.mktemp("corpus") / "docstrings.csv"
    rows = docstring_corpus.build_rows()
    docstring_corpus.write_csv(path, rows)
    return path, Counter(label for _, label in rows)


def test_real_corpus_ingests_without_rejects_and_samples_stratified(tmp_path, corpus):
    path, classes = corpus
    rows = sum(classes.values())
    multiline = sum("\n" in text for text, _ in csv.reader(path.open(newline="", encoding="utf-8")))
    assert rows > 2000 and multiline > rows // 3  # the file really has values spanning lines

    fraction, validation, test = 0.37, 0.1, 0.1
    cfg = build_config(
        {
            "task": "classification",
            "data": {"source": str(path)},
            "sample": {"fraction": fraction, "stratify_by": "label", "validation_fraction": validation, "test_fraction": test, "seed": 3},
        }
    )
    ingested = stages.materialize("ingest", cfg, {}, str(tmp_path / "runs"), log=quiet)
    assert ingested.stats["rows_in"] == rows
    assert (ingested.stats["rows_out"], ingested.stats["rows_rejected"]) == (rows, 0)

    sampled = stages.materialize("sample", cfg, {"ingest": ingested.artifact}, str(tmp_path / "runs"), log=quiet)
    kept = sum(sampled.stats["splits"][s]["rows"] for s in ("train", "validation", "test"))
    assert abs(kept - fraction * rows) <= 1
    per_class = Counter()
    for split in ("train", "validation", "test"):
        table = pq.read_table(Path(sampled.output) / f"{split}.parquet")
        counts = Counter(table["label"].to_pylist())
        assert counts == Counter(sampled.stats["splits"][split]["classes"])
        per_class.update(counts)
    for label, total in classes.items():
        # Within one row of the exact proportion, for every class.
        assert abs(per_class[label] - fraction * total) < 1 + 1e-9, (label, per_class[label], fraction * total)


@pytest.mark.integration
def test_s3_source_and_workdir_give_the_bytes_of_a_local_run(tmp_path, s3_bucket, corpus):
    path, _ = corpus
    fs = fsspec.filesystem("s3")
    fs.put_file(str(path), f"{s3_bucket}/raw/docstrings.csv")
    settings = {
        "task": "classification",
        "sample": {"count": 600, "stratify_by": "label", "validation_fraction": 0.1, "dedup": "exact"},
        "tokenize": {"vocab_size": 400, "block_size": 64},
    }
    local = run_data_stages(build_config({**settings, "data": {"source": str(path)}}), str(tmp_path / "runs"))
    remote = run_data_stages(
        build_config({**settings, "data": {"source": f"s3://{s3_bucket}/raw/*.csv"}}), f"s3://{s3_bucket}/work"
    )
    for name in DATA_STAGES:
        assert remote[name].stats == local[name].stats, name
        # Same names, sizes and sha256s; only a local output records modification times (reuse's fast path).
        without_mtime = lambda files: {rel: {k: v for k, v in entry.items() if k != "mtime_ns"} for rel, entry in files.items()}  # noqa: E731
        local_files = without_mtime(artifacts.read_json(str(Path(local[name].output) / artifacts.MANIFEST))["files"])
        remote_files = artifacts.read_json(f"{remote[name].output}/{artifacts.MANIFEST}")["files"]
        # Every file the stage wrote, byte for byte (the manifest lists their sha256).
        assert remote_files == local_files, name
    assert local["ingest"].stats["rows_rejected"] == 0
