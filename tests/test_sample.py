"""Sample: seeded selection and the train/validation split, on real ingest outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import ingest, sample, stages
from pipeline.config import build_config


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "prompt", "response"])
        writer.writerows([str(i), f"question {i}", f"answer {i}"] for i in range(1000))
    return path


def ingested(tmp_path: Path, source: Path, shard_rows: int = 1000) -> Path:
    cfg = build_config({"data": {"source": str(source), "shard_rows": shard_rows}})
    out = tmp_path / f"ingest-{shard_rows}"
    out.mkdir()
    ingest.run(cfg.data, inputs={}, out=out, scratch=tmp_path / "scratch")
    return out


def run_sample(tmp_path: Path, ingest_out: Path, name: str = "sample", **options) -> tuple[dict, list, list]:
    cfg = build_config({"sample": options}).sample
    out = tmp_path / name
    out.mkdir()
    stats = sample.run(cfg, inputs={"ingest": ingest_out}, out=out, scratch=tmp_path / "scratch")
    ids = [pq.read_table(out / f"{split}.parquet").column("id").to_pylist() for split in ("train", "validation")]
    return stats, *ids


def test_same_seed_same_rows_different_seed_different_rows(tmp_path, source):
    ingest_out = ingested(tmp_path, source)
    _, train1, val1 = run_sample(tmp_path, ingest_out, "a", count=200, seed=1)
    _, train2, val2 = run_sample(tmp_path, ingest_out, "b", count=200, seed=1)
    _, train3, val3 = run_sample(tmp_path, ingest_out, "c", count=200, seed=2)

    assert (train1, val1) == (train2, val2)
    assert set(train1 + val1) != set(train3 + val3)


def test_rows_do_not_depend_on_shard_boundaries(tmp_path, source):
    whole, sharded = ingested(tmp_path, source, 1000), ingested(tmp_path, source, 70)
    assert len(list((sharded / "shards").iterdir())) == 15

    assert run_sample(tmp_path, whole, "a", fraction=0.3)[1:] == run_sample(tmp_path, sharded, "b", fraction=0.3)[1:]


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"count": 100}, (95, 5)),
        ({"fraction": 0.25, "validation_fraction": 0.2}, (200, 50)),
        ({"validation_fraction": 0.1}, (900, 100)),
        ({"count": 5000}, (950, 50)),  # more than there is: everything
        ({"count": 10, "validation_fraction": 0.0}, (10, 0)),
        ({"count": 2, "validation_fraction": 0.01}, (1, 1)),  # at least one validation row
        ({"count": 1}, (1, 0)),  # ... but never the only row
    ],
)
def test_split_sizes(tmp_path, source, options, expected):
    stats, train, validation = run_sample(tmp_path, ingested(tmp_path, source), **options)

    assert (len(train), len(validation)) == expected
    assert stats == {"rows_in": 1000, "train": expected[0], "validation": expected[1]}
    assert not set(train) & set(validation)
    assert set(train) | set(validation) <= {str(i) for i in range(1000)}


def test_outputs_keep_the_input_columns(tmp_path, source):
    run_sample(tmp_path, ingested(tmp_path, source), count=3, validation_fraction=0.0)

    for split in ("train", "validation"):
        table = pq.read_table(tmp_path / "sample" / f"{split}.parquet")
        assert table.column_names == ["id", "prompt", "response"]
    rows = pq.read_table(tmp_path / "sample" / "train.parquet").to_pylist()
    assert all(r["prompt"] == f"question {r['id']}" and r["response"] == f"answer {r['id']}" for r in rows)


def test_runner_chains_ingest_into_sample(tmp_path, source):
    cfg = build_config({"data": {"source": str(source)}, "sample": {"count": 50, "seed": 3}})
    workdir = str(tmp_path / "runs")
    quiet = dict(workdir=workdir, log=lambda _: None)

    ingested_ = stages.materialize("ingest", cfg, {}, **quiet)
    sampled = stages.materialize("sample", cfg, {"ingest": ingested_.artifact}, **quiet)

    assert sampled.stats == {"rows_in": 1000, "train": 48, "validation": 2}
    assert (Path(sampled.output) / "manifest.json").exists()
    assert pq.read_table(Path(sampled.output) / "train.parquet").num_rows == 48
