"""Sample: dedup, seeded selection, stratified and grouped train/validation/test splits, on real shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import stages
from pipeline.data import sample
from pipeline.artifacts import Artifact
from pipeline.config import ConfigError, build_config

ROWS = 1000
# Five classes of 60/20/10/7/3 %, interleaved so that every shard holds several of them.
CLASS_SHARES = {"billing": 600, "bug": 200, "feature": 100, "account": 70, "legal": 30}


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    # Batches of 64 rows and writes every 100: every test crosses batch and row-group boundaries.
    monkeypatch.setattr(sample, "BATCH_ROWS", 64)
    monkeypatch.setattr(sample, "WRITE_ROWS", 100)


def labels() -> list[str]:
    names = [name for name, n in CLASS_SHARES.items() for _ in range(n)]
    return [names[i] for i in np.random.default_rng(7).permutation(ROWS)]


def dataset() -> dict[str, list[str]]:
    return {
        "id": [str(i) for i in range(ROWS)],
        "prompt": [f"question {i}" for i in range(ROWS)],
        "response": [f"answer {i}" for i in range(ROWS)],
        "label": labels(),
        "user": [f"user{i % 97}" for i in range(ROWS)],  # 97 groups of 10 or 11 rows
    }


def write_shards(folder: Path, columns: dict[str, list], shard_rows: int = 300) -> Path:
    """What ingest writes: shards/part-NNNNN.parquet, every column a string, in row order."""
    (folder / "shards").mkdir(parents=True)
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    for n, start in enumerate(range(0, table.num_rows, shard_rows)):
        pq.write_table(table.slice(start, shard_rows), folder / "shards" / f"part-{n:05d}.parquet")
    return folder


def run_sample(tmp_path: Path, ingest_out: Path, name: str = "sample", task: str = "causal_lm", **options) -> tuple[dict, dict]:
    """Stats and {split: list of row dicts}."""
    cfg = build_config({"task": task, "data": {"text_column": "prompt"}, "sample": options})
    out = tmp_path / name
    out.mkdir()
    stats = sample.run(cfg.sample, cfg.row_spec, inputs={"ingest": ingest_out}, out=out, scratch=tmp_path / "scratch")
    return stats, {split: pq.read_table(out / f"{split}.parquet").to_pylist() for split in sample.SPLITS}


def ids(rows: list[dict]) -> list[int]:
    return [int(r["id"]) for r in rows]


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_shards(tmp_path / "ingest", dataset())


def test_same_seed_same_rows_different_seed_different_rows(tmp_path, shards):
    options = dict(count=200, test_fraction=0.1, stratify_by="label")
    _, a = run_sample(tmp_path, shards, "a", seed=1, **options)
    _, b = run_sample(tmp_path, shards, "b", seed=1, **options)
    _, c = run_sample(tmp_path, shards, "c", seed=2, **options)

    assert a == b
    assert {s: len(r) for s, r in a.items()} == {"train": 170, "validation": 10, "test": 20}
    assert set(ids(a["train"])) != set(ids(c["train"]))


@pytest.mark.parametrize(
    "options",
    [
        dict(fraction=0.3, test_fraction=0.1, stratify_by="label", dedup="minhash"),
        dict(count=333, group_by="user"),
    ],
    ids=["stratified-minhash", "grouped"],
)
def test_rows_do_not_depend_on_shard_boundaries(tmp_path, options):
    data = dataset()
    data["response"][500] = data["response"][3] = "answer 3"  # a duplicate for dedup to find
    data["prompt"][500] = "question 3"
    whole = write_shards(tmp_path / "whole", data, shard_rows=ROWS)
    sharded = write_shards(tmp_path / "sharded", data, shard_rows=70)
    assert len(list((sharded / "shards").iterdir())) == 15

    stats_whole, rows_whole = run_sample(tmp_path, whole, "a", **options)
    stats_sharded, rows_sharded = run_sample(tmp_path, sharded, "b", **options)

    assert rows_whole == rows_sharded
    assert stats_whole == stats_sharded


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"count": 100}, (95, 5, 0)),
        ({"fraction": 0.25, "validation_fraction": 0.2}, (200, 50, 0)),
        ({"validation_fraction": 0.1}, (900, 100, 0)),
        ({"count": 5000}, (950, 50, 0)),  # more than there is: everything
        ({"count": 10, "validation_fraction": 0.0}, (10, 0, 0)),
        ({"count": 2, "validation_fraction": 0.01}, (1, 1, 0)),  # at least one validation row
        ({"count": 1}, (1, 0, 0)),  # ... but never the only row
        ({"count": 200, "validation_fraction": 0.1, "test_fraction": 0.15}, (150, 20, 30)),
        ({"count": 3, "validation_fraction": 0.01, "test_fraction": 0.01}, (1, 1, 1)),
        ({"count": 2, "validation_fraction": 0.01, "test_fraction": 0.01}, (1, 1, 0)),  # train keeps a row
        ({"count": 10, "validation_fraction": 0.0, "test_fraction": 0.2}, (8, 0, 2)),
    ],
)
def test_split_sizes(tmp_path, shards, options, expected):
    stats, rows = run_sample(tmp_path, shards, **options)

    train, validation, test = (set(ids(rows[s])) for s in sample.SPLITS)
    assert (len(train), len(validation), len(test)) == expected
    assert {s: stats["splits"][s]["rows"] for s in sample.SPLITS} == dict(zip(sample.SPLITS, expected))
    assert stats["rows_out"] == sum(expected) and stats["rows_not_sampled"] == ROWS - sum(expected)
    assert not (train & validation) and not (train & test) and not (validation & test)


def test_outputs_keep_the_columns_and_the_input_order(tmp_path, shards):
    _, rows = run_sample(tmp_path, shards, count=300, validation_fraction=0.1)

    for split in sample.SPLITS:  # test: 0 rows, but a file with the same columns
        schema = pq.read_schema(tmp_path / "sample" / f"{split}.parquet")
        assert schema.names == ["id", "prompt", "response", "label", "user"]
        assert set(schema.types) == {pa.string()}
    assert rows["test"] == []
    for split in ("train", "validation"):
        assert ids(rows[split]) == sorted(ids(rows[split]))
        assert all(r["prompt"] == f"question {r['id']}" and r["response"] == f"answer {r['id']}" for r in rows[split])


def test_stratified_sample_and_every_split_keep_the_class_proportions(tmp_path, shards):
    stats, rows = run_sample(
        tmp_path, shards, fraction=0.37, validation_fraction=0.15, test_fraction=0.15, stratify_by="label", seed=3
    )

    sampled = {c: sum(r["label"] == c for split in rows.values() for r in split) for c in CLASS_SHARES}
    assert sum(sampled.values()) == 370
    for c, n in CLASS_SHARES.items():
        assert abs(sampled[c] - 370 * n / ROWS) < 1, c
    # Rounding validation and test each on their own would give class "feature" 27 train rows here (25.8 due).
    sizes = {"train": 258, "validation": 56, "test": 56}
    for split, size in sizes.items():
        counts = {c: sum(r["label"] == c for r in rows[split]) for c in CLASS_SHARES}
        assert sum(counts.values()) == size
        assert stats["splits"][split] == {"rows": size, "classes": counts}
        for c in CLASS_SHARES:
            assert abs(counts[c] - sampled[c] * size / 370) < 1, (split, c)
            assert abs(counts[c] - CLASS_SHARES[c] * 0.37 * size / 370) < 2, (split, c)
    assert stats["classes"] == CLASS_SHARES


def test_split_apportionment_is_within_one_row_for_every_class_and_split():
    """Rounding each split on its own can leave a class two rows off in train; the table never is."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        class_rows = rng.integers(0, rng.integers(1, 40), size=rng.integers(1, 12))
        total = int(class_rows.sum())
        validation = int(rng.integers(0, total + 1))
        test = int(rng.integers(0, total - validation + 1))
        split_rows = [total - validation - test, validation, test]

        table = sample.apportion_splits(class_rows, split_rows)

        assert (table.sum(axis=1) == class_rows).all() and (table.sum(axis=0) == split_rows).all()
        assert (np.abs(table - np.outer(class_rows, split_rows) / max(total, 1)) < 1).all()


def test_null_and_empty_labels_form_one_class(tmp_path):
    data = {"id": [str(i) for i in range(40)], "label": ["a", None, "", "b"] * 10}
    shards = write_shards(tmp_path / "ingest", data, shard_rows=15)

    stats, rows = run_sample(tmp_path, shards, stratify_by="label", validation_fraction=0.25)

    assert stats["classes"] == {"": 20, "a": 10, "b": 10}
    validation = stats["splits"]["validation"]["classes"]
    assert validation[""] == 5 and sorted([validation["a"], validation["b"]]) == [2, 3]
    assert sum(r["label"] is None for r in rows["train"] + rows["validation"]) == 10  # rows are written as they were


@pytest.mark.parametrize("stratify_by", [None, "label"])
def test_a_group_never_spans_two_splits(tmp_path, shards, stratify_by):
    stats, rows = run_sample(
        tmp_path, shards, fraction=0.8, validation_fraction=0.1, test_fraction=0.1, group_by="user", stratify_by=stratify_by
    )

    users = {s: {r["user"] for r in rows[s]} for s in sample.SPLITS}
    assert not (users["train"] & users["validation"]) and not (users["train"] & users["test"])
    assert not (users["validation"] & users["test"])
    # Whole groups of about 8 sampled rows fill each held-out split to its 80-row target.
    for split in ("validation", "test"):
        assert 80 <= len(rows[split]) < 80 + 20
        assert stats["splits"][split]["groups"] == len(users[split])
    assert sum(len(r) for r in rows.values()) == 800
    if stratify_by:
        sampled = {c: sum(s["classes"][c] for s in stats["splits"].values()) for c in CLASS_SHARES}
        assert all(abs(sampled[c] - 0.8 * n) < 1 for c, n in CLASS_SHARES.items())


def test_one_group_stays_in_train(tmp_path):
    shards = write_shards(tmp_path / "ingest", {"id": [str(i) for i in range(10)], "user": ["u"] * 10})

    stats, rows = run_sample(tmp_path, shards, group_by="user", validation_fraction=0.2)

    assert (len(rows["train"]), len(rows["validation"])) == (10, 0)


def test_exact_dedup_ignores_case_spacing_and_unicode_form(tmp_path):
    prompts = ["Reset my password", "reset  MY password ", "Ｒｅｓｅｔ my\tpassword", "Reset my passwords", "Reset my password"]
    responses = ["Use the link.", "use the link.", "Use the link.", "Use the link.", "Use the other link."]
    data = {"id": [str(i) for i in range(5)], "prompt": prompts, "response": responses}
    shards = write_shards(tmp_path / "ingest", data, shard_rows=2)

    stats, rows = run_sample(tmp_path, shards, dedup="exact", validation_fraction=0.0)

    assert ids(rows["train"]) == [0, 3, 4]  # 1 and 2 repeat row 0 (the first one is kept)
    assert (stats["rows_in"], stats["duplicates_removed"], stats["near_duplicates_removed"], stats["rows_out"]) == (5, 2, 0, 3)


def test_exact_dedup_compares_only_the_chosen_columns(tmp_path, shards):
    stats, rows = run_sample(tmp_path, shards, dedup="exact", dedup_columns=["label"], validation_fraction=0.0)

    assert stats["duplicates_removed"] == ROWS - 5
    assert sorted(r["label"] for r in rows["train"]) == sorted(CLASS_SHARES)


def test_minhash_removes_a_near_duplicate_that_exact_keeps(tmp_path):
    words = np.random.default_rng(0).choice([f"w{i}" for i in range(3000)], size=(6, 80))
    texts = [" ".join(w) for w in words]
    near = " ".join([*words[1][:40], "changed", *words[1][41:]])  # one word of 80: 3 of 78 shingles differ
    prompts = texts + [near, texts[2].upper()]
    data = {"id": [str(i) for i in range(8)], "prompt": prompts, "response": ["r"] * 8}
    shards = write_shards(tmp_path / "ingest", data, shard_rows=3)

    exact, exact_rows = run_sample(tmp_path, shards, "exact", dedup="exact", validation_fraction=0.0)
    stats, rows = run_sample(tmp_path, shards, "minhash", dedup="minhash", validation_fraction=0.0)

    assert ids(exact_rows["train"]) == [0, 1, 2, 3, 4, 5, 6]
    assert ids(rows["train"]) == [0, 1, 2, 3, 4, 5]
    assert (stats["duplicates_removed"], stats["near_duplicates_removed"], stats["rows_out"]) == (1, 1, 6)


@pytest.mark.parametrize(
    "key, value",
    [("stratify_by", "lable"), ("group_by", "users"), ("dedup_columns", ["prompt", "answer"])],
)
def test_a_wrong_column_name_fails_before_anything_is_written(tmp_path, shards, key, value):
    cfg = build_config({"sample": {key: value, "dedup": "exact"}})
    out = tmp_path / "out"
    out.mkdir()
    wrong = value[-1] if isinstance(value, list) else value

    with pytest.raises(ConfigError) as error:
        sample.run(cfg.sample, cfg.row_spec, inputs={"ingest": shards}, out=out, scratch=tmp_path / "scratch")

    assert str(error.value) == (
        f"sample.{key}: column '{wrong}' not in the ingest output; it has ['id', 'prompt', 'response', 'label', 'user']"
    )
    assert list(out.iterdir()) == []


def test_stats_add_up(tmp_path):
    data = dataset()
    for i in range(0, 100, 10):  # ten exact copies of earlier rows
        data["prompt"][900 + i // 10], data["response"][900 + i // 10] = data["prompt"][i], data["response"][i].upper()
    shards = write_shards(tmp_path / "ingest", data)

    stats, rows = run_sample(tmp_path, shards, dedup="exact", fraction=0.5, test_fraction=0.1, stratify_by="label")

    assert stats["duplicates_removed"] == 10
    assert stats["rows_in"] == stats["rows_out"] + stats["duplicates_removed"] + stats["near_duplicates_removed"] + stats["rows_not_sampled"]
    assert stats["rows_out"] == 495 == sum(len(r) for r in rows.values())
    assert sum(stats["classes"].values()) == 990
    for split in sample.SPLITS:
        assert sum(stats["splits"][split]["classes"].values()) == stats["splits"][split]["rows"] == len(rows[split])


def test_classification_reports_classes_per_split_without_stratify(tmp_path, shards):
    stats, rows = run_sample(tmp_path, shards, task="classification", count=100)

    assert stats["classes"] == CLASS_SHARES
    for split in sample.SPLITS:
        counts = stats["splits"][split]["classes"]
        assert set(counts) == set(CLASS_SHARES)
        assert counts == {c: sum(r["label"] == c for r in rows[split]) for c in CLASS_SHARES}


def test_first_pass_reads_only_the_key_columns(tmp_path, shards, monkeypatch):
    """Bounded memory: only pass 2, which streams batch by batch, reads every column."""
    asked = []
    real = sample.read_batches
    monkeypatch.setattr(sample, "read_batches", lambda paths, columns: asked.append(columns) or real(paths, columns))
    cfg = build_config({"sample": {"stratify_by": "label", "group_by": "user", "dedup": "exact", "count": 50}})
    with monkeypatch.context() as patch:
        patch.setattr(pq, "read_table", None)  # nothing may load a whole table
        stats = sample.run(cfg.sample, cfg.row_spec, inputs={"ingest": shards}, out=tmp_path, scratch=tmp_path / "scratch")

    assert asked == [["prompt", "response", "label", "user"], None]
    assert stats["rows_out"] == 50 == sum(pq.read_table(tmp_path / f"{s}.parquet").num_rows for s in sample.SPLITS)


def test_runner_chains_ingest_output_into_sample(tmp_path, shards):
    cfg = build_config({"sample": {"count": 50, "seed": 3, "dedup": "exact"}})
    ingested = Artifact("ingest", "0" * 64, str(shards), {"rows_out": ROWS})

    sampled = stages.materialize("sample", cfg, {"ingest": ingested}, workdir=str(tmp_path / "runs"), log=lambda _: None)

    assert sampled.stats["splits"]["train"]["rows"] == 48 and sampled.stats["splits"]["validation"]["rows"] == 2
    # The commit records the chain: this output's files and stats, and the ingest output it read.
    manifest = json.loads((Path(sampled.output) / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["test.parquet", "train.parquet", "validation.parquet"]
    assert manifest["stats"] == sampled.stats and manifest["fingerprint"] == sampled.fingerprint
    assert manifest["parents"] == {"ingest": {"fingerprint": "0" * 64, "url": str(shards)}}
    assert pq.read_table(Path(sampled.output) / "test.parquet").num_rows == 0
