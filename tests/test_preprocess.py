import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import preprocess, stages
from pipeline.artifacts import Artifact
from pipeline.config import ConfigError, build_config


def write_sample(folder: Path, splits: dict[str, list[tuple[str, str]]], columns=("prompt", "response")) -> Path:
    """A sample-stage folder; row groups of 2 rows so the stage reads several batches."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        table = pa.table(
            {
                columns[0]: pa.array([p for p, _ in rows], pa.string()),
                columns[1]: pa.array([r for _, r in rows], pa.string()),
                "source_row": pa.array([str(i) for i in range(len(rows))], pa.string()),
            }
        )
        pq.write_table(table, folder / f"{split}.parquet", row_group_size=2)
    return folder


ROWS = {
    "train": [("How do I reset it?", "Hold the button."), ("Où est-il?", "Ici, 日本."), ("a", "b"), ("", "empty prompt")],
    "validation": [("Refund?", "Within 30 days.")],
}


def run_preprocess(tmp_path: Path, raw: dict, rows=ROWS, columns=("prompt", "response")) -> tuple[Path, dict]:
    cfg = build_config(raw)
    sample = write_sample(tmp_path / "sample", rows, columns)
    out = tmp_path / "out"
    out.mkdir()
    stats = preprocess.run(cfg.preprocess, cfg.data, inputs={"sample": sample}, out=out, scratch=tmp_path / "scratch")
    return out, stats


def test_templates_text_and_prompt_chars(tmp_path):
    raw = {
        "data": {"prompt_column": "question", "response_column": "answer"},
        "preprocess": {"prompt_template": "Q: {prompt}\nA: ", "response_template": "{response} {{done}}"},
    }
    out, stats = run_preprocess(tmp_path, raw, columns=("question", "answer"))

    assert stats == {"train_rows": 4, "validation_rows": 1}
    train = pq.read_table(out / "train.parquet")
    assert train.column_names == ["prompt", "response", "text", "prompt_chars"]
    assert train.schema.field("prompt_chars").type == pa.int64()
    rows = train.to_pylist()
    assert rows[1] == {
        "prompt": "Q: Où est-il?\nA: ",
        "response": "Ici, 日本. {done}",
        "text": "Q: Où est-il?\nA: Ici, 日本. {done}",
        "prompt_chars": len("Q: Où est-il?\nA: "),
    }
    for row in rows:
        assert row["text"][: row["prompt_chars"]] == row["prompt"]
        assert row["text"][row["prompt_chars"] :] == row["response"]
    assert pq.read_table(out / "validation.parquet").column("text").to_pylist() == ["Q: Refund?\nA: Within 30 days. {done}"]


@pytest.mark.parametrize(
    "key, template, message",
    [
        ("prompt_template", "{prompt} with {context}", "{context}"),
        ("prompt_template", "Q: {}", "{}"),
        ("response_template", "{prompt}{response}", "{prompt}"),
        ("prompt_template", "Q: {prompt", "literal braces"),
    ],
)
def test_bad_template_fails_before_writing(tmp_path, key, template, message):
    with pytest.raises(ConfigError, match=f"preprocess.{key}") as error:
        run_preprocess(tmp_path, {"preprocess": {key: template}})
    assert message in str(error.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_column_is_named(tmp_path):
    with pytest.raises(ValueError, match="'instruction'"):
        run_preprocess(tmp_path, {"data": {"prompt_column": "instruction"}})


def test_empty_validation_split_still_has_schema(tmp_path):
    out, stats = run_preprocess(tmp_path, {}, rows={"train": ROWS["train"], "validation": []})
    assert stats["validation_rows"] == 0
    validation = pq.read_table(out / "validation.parquet")
    assert validation.num_rows == 0
    assert validation.column_names == ["prompt", "response", "text", "prompt_chars"]


def test_materialize_commits_then_reuses(tmp_path):
    cfg = build_config({"preprocess": {"prompt_template": "<{prompt}>"}})
    sample = write_sample(tmp_path / "sample", ROWS)
    parents = {"sample": Artifact("sample", "fp", str(sample))}

    first = stages.materialize("preprocess", cfg, parents, workdir=str(tmp_path / "runs"), log=lambda _: None)
    second = stages.materialize("preprocess", cfg, parents, workdir=str(tmp_path / "runs"), log=lambda _: None)

    assert (first.status, second.status) == ("ran", "cached")
    assert second.stats == {"train_rows": 4, "validation_rows": 1}
    manifest = json.loads((Path(first.output) / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["train.parquet", "validation.parquet"]
    assert pq.read_table(Path(first.output) / "train.parquet").column("prompt")[0].as_py() == "<How do I reset it?>"
