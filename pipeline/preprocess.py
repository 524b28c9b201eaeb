"""Preprocess stage: render the prompt and response templates for every sampled row.

Run through the pipeline (`tunepipe run examples/quickstart.yaml`) or directly:

    run(cfg.preprocess, cfg.data, inputs={"sample": Path("runs/sample/<fp>")}, out=out, scratch=tmp)

Reads `train.parquet` and `validation.parquet` from the sample stage and writes the same two
files with columns `prompt`, `response`, `text` (= prompt + response) and `prompt_chars`
(where the prompt ends inside `text`; tokenize masks the loss up to there).
"""

from __future__ import annotations

import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, DataConfig, PreprocessConfig

SPLITS = ("train", "validation")
OUTPUT_SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("text", pa.string()),
        ("prompt_chars", pa.int64()),
    ]
)


def check_template(key: str, template: str, allowed: str) -> None:
    """Fail before any data is read when a template names a field other than `{allowed}`.

    Otherwise the first row would raise a bare KeyError deep inside the stage.
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # unbalanced braces, e.g. "{prompt"
        raise ConfigError(f"config key '{key}': {e} in {template!r} (write {{{{ or }}}} for literal braces)") from None
    for name in fields:
        # "{prompt.upper}" or "{prompt[0]}" still refer to the field `prompt`.
        base = name.split(".", 1)[0].split("[", 1)[0]
        if base != allowed:
            shown = "{}" if name == "" else "{" + name + "}"
            raise ConfigError(
                f"config key '{key}': template names {shown}, but only {{{allowed}}} is available: {template!r}"
            )


def render_split(src: Path, dst: Path, cfg: PreprocessConfig, data: DataConfig) -> int:
    """Template one split batch by batch; returns its row count."""
    source = pq.ParquetFile(src)
    columns = [data.prompt_column, data.response_column]
    missing = [c for c in columns if c not in source.schema_arrow.names]
    if missing:
        raise ValueError(f"{src}: no column(s) {missing}; it has {source.schema_arrow.names} (see data.prompt_column / data.response_column)")
    rows = 0
    # The writer is opened before the first batch so that an empty split still gets a file with the schema.
    with pq.ParquetWriter(dst, OUTPUT_SCHEMA) as writer:
        for batch in source.iter_batches(columns=columns):
            prompts, responses = (batch.column(c) for c in columns)
            for name, column in zip(columns, (prompts, responses)):
                if column.null_count:
                    raise ValueError(f"{src}: column '{name}' has {column.null_count} null value(s); ingest should have rejected them")
            prompt_text = [cfg.prompt_template.format_map({"prompt": p}) for p in prompts.to_pylist()]
            response_text = [cfg.response_template.format_map({"response": r}) for r in responses.to_pylist()]
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array(prompt_text, pa.string()),
                        pa.array(response_text, pa.string()),
                        pa.array([p + r for p, r in zip(prompt_text, response_text)], pa.string()),
                        pa.array([len(p) for p in prompt_text], pa.int64()),
                    ],
                    schema=OUTPUT_SCHEMA,
                )
            )
            rows += batch.num_rows
    return rows


def run(cfg: PreprocessConfig, data: DataConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    check_template("preprocess.prompt_template", cfg.prompt_template, "prompt")
    check_template("preprocess.response_template", cfg.response_template, "response")
    stats = {}
    for split in SPLITS:
        stats[f"{split}_rows"] = render_split(Path(inputs["sample"]) / f"{split}.parquet", out / f"{split}.parquet", cfg, data)
    return stats
