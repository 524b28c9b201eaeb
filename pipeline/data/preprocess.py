"""Preprocess stage: turn every sampled row into the text the model trains on.

Run through the pipeline (`tunepipe run examples/quickstart.yaml`) or directly:

    cfg = load_config("examples/quickstart.yaml")
    run(cfg.preprocess, cfg.row_spec, inputs={"sample": Path("runs/sample/<fp>")}, out=out, scratch=tmp)

For each split it reads `<split>.parquet` from the sample stage batch by batch, normalises the
text columns (data/normalize.py), renders the task's layout, drops rows that fail
validation or the length filters, and writes:

    <split>.parquet   train, validation, test; columns by task and template:
                      causal_lm prompt_response / instruction / text: prompt, response, text (= prompt + response)
                      causal_lm chat: messages (canonical JSON list of {"role", "content"}), text (contents joined by "\\n")
                      classification: text, label
                      seq2seq: source, target, text (= source + "\\n" + target)
                      preference: prompt (or messages), chosen, rejected, text (data/preference.py)
    rejects.jsonl     one {"split", "row", "reason", "raw"} per dropped row; `row` counts from 0 within the split

Normalisation applies to the column values, never to the templates around them: a template's
"### Question:" must reach the model as written, whatever `strip_punctuation` says.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, PreprocessConfig, RowSpec
from pipeline.data.messages import Reject, normalize_messages
from pipeline.data.normalize import Normalizer, make_normalizer, stopwords_digest
from pipeline.data import preference

SPLITS = ("train", "validation", "test")
OPTIONAL_SPLITS = ("test",)  # sample outputs from before the test split have no test.parquet
BATCH_ROWS = 8192
"""Rows per record batch: memory stays bounded by one batch, whatever the split's size."""
RAW_CHARS = 2000
"""About this many characters of a rejected row go into rejects.jsonl."""

OUTPUT_COLUMNS = {
    "prompt_response": ("prompt", "response", "text"),
    "instruction": ("prompt", "response", "text"),
    "text": ("prompt", "response", "text"),
    "chat": ("messages", "text"),
    "classification": ("text", "label"),
    "seq2seq": ("source", "target", "text"),
    **preference.OUTPUT_COLUMNS,
}
# What the model learns to produce, by layout: the part `min_chars` measures.
LEARNED_PART = {
    "prompt_response": "response",
    "instruction": "output",
    "text": "text",
    "chat": "assistant messages",
    "classification": "text",
    "seq2seq": "target",
    "preference": "shorter answer",
    "preference_chat": "shorter answer",
}
COLUMN_KEYS = {
    "prompt": "data.prompt_column",
    "response": "data.response_column",
    "instruction": "data.instruction_column",
    "input": "data.input_column",
    "output": "data.output_column",
    "messages": "data.messages_column",
    "text": "data.text_column",
    "source": "data.text_column",
    "label": "data.label_column",
    "target": "data.target_column",
    "chosen": "data.chosen_column",
    "rejected": "data.rejected_column",
}
TEMPLATES = {
    "prompt_response": (("prompt_template", ("prompt",)), ("response_template", ("response",))),
    "instruction": (("instruction_template", ("instruction", "input")), ("instruction_template_no_input", ("instruction",))),
    "preference": (("prompt_template", ("prompt",)), ("response_template", ("response",))),
}
# A label is a class name, not text: lowercasing it or removing its punctuation would merge or
# rename classes, so it is only stripped of surrounding spaces. (Messages are JSON: their
# contents are normalised once parsed, see normalize_messages.)
NOT_NORMALISED = frozenset({"label"})


Rendered = tuple[dict[str, str], str]
"""An output row and its learned part."""


def layout(spec: RowSpec) -> str:
    return spec.template if spec.task in ("causal_lm", "preference") else spec.task


# ---------------------------------------------------------------- checks before any data is read


def check_template(key: str, template: str, allowed: str | Iterable[str]) -> None:
    """Fail before any data is read when a template names a field it will not be given.

    Otherwise the first row would raise a bare KeyError deep inside the stage.
    """
    allowed = (allowed,) if isinstance(allowed, str) else tuple(allowed)
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # unbalanced braces, e.g. "{prompt"
        raise ConfigError(f"config key '{key}': {e} in {template!r} (write {{{{ or }}}} for literal braces)") from None
    for name in fields:
        # "{prompt.upper}" or "{prompt[0]}" still refer to the field `prompt`.
        base = name.split(".", 1)[0].split("[", 1)[0]
        if base not in allowed:
            shown = "{}" if name == "" else "{" + name + "}"
            names = " and ".join("{" + a + "}" for a in allowed)
            available = f"only {names} {'is' if len(allowed) == 1 else 'are'} available"
            raise ConfigError(f"config key '{key}': template names {shown}, but {available}: {template!r}")


def check_templates(cfg: PreprocessConfig, spec: RowSpec) -> None:
    for field, allowed in TEMPLATES.get(layout(spec), ()):
        check_template(f"preprocess.{field}", getattr(cfg, field), allowed)


def check_columns(path: Path, spec: RowSpec) -> None:
    names = pq.read_schema(path).names
    for role, column in spec.columns.items():
        if column not in names and role not in spec.optional:
            raise ValueError(
                f"{path}: no column '{column}', which the {layout(spec)} layout reads as its {role} "
                f"(config key {COLUMN_KEYS[role]}); the columns are {names}"
            )


# ---------------------------------------------------------------- one row -> output row


def render_prompt_response(row: dict, cfg: PreprocessConfig) -> Rendered:
    prompt = cfg.prompt_template.format_map({"prompt": row["prompt"]})
    response = cfg.response_template.format_map({"response": row["response"]})
    return {"prompt": prompt, "response": response, "text": prompt + response}, row["response"]


def render_instruction(row: dict, cfg: PreprocessConfig) -> Rendered:
    fields = {"instruction": row["instruction"], "input": row.get("input") or ""}
    # Alpaca rows without context use a template with no "### Input:" section rather than an empty one.
    template = cfg.instruction_template if fields["input"].strip() else cfg.instruction_template_no_input
    prompt = template.format_map(fields)
    return {"prompt": prompt, "response": row["output"], "text": prompt + row["output"]}, row["output"]


def render_text(row: dict, cfg: PreprocessConfig) -> Rendered:
    return {"prompt": "", "response": row["text"], "text": row["text"]}, row["text"]


def render_chat(row: dict, cfg: PreprocessConfig) -> Rendered | Reject:
    messages = row["messages"]
    if isinstance(messages, Reject):
        return messages
    # The chat template is applied by tokenize, which owns the tokenizer; `text` serves scratch
    # tokenizer training and the length filter.
    text = "\n".join(m["content"] for m in messages)
    learned = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
    return {"messages": json.dumps(messages, ensure_ascii=False), "text": text}, learned


def render_classification(row: dict, cfg: PreprocessConfig) -> Rendered | Reject:
    label = row["label"].strip()
    if not label:
        return Reject("missing_value", "the label is blank")
    return {"text": row["text"], "label": label}, row["text"]


def render_seq2seq(row: dict, cfg: PreprocessConfig) -> Rendered:
    return {"source": row["source"], "target": row["target"], "text": row["source"] + "\n" + row["target"]}, row["target"]


RENDERERS: dict[str, Callable[[dict, PreprocessConfig], Rendered | Reject]] = {
    "prompt_response": render_prompt_response,
    "instruction": render_instruction,
    "text": render_text,
    "chat": render_chat,
    "classification": render_classification,
    "seq2seq": render_seq2seq,
    "preference": preference.render,
    "preference_chat": preference.render_chat,
}


def check_lengths(text: str, learned: str, what: str, cfg: PreprocessConfig) -> Reject | None:
    if len(learned) < cfg.min_chars:
        return Reject("too_short", f"{what} has {len(learned)} characters after normalisation; preprocess.min_chars is {cfg.min_chars}")
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return Reject("too_long", f"text has {len(text)} characters; preprocess.max_chars is {cfg.max_chars}")
    return None


# ---------------------------------------------------------------- one split


def raw_row(row: dict) -> dict:
    # A row can hold a whole document; rejects.jsonl should stay readable, so each value gets
    # its share of about RAW_CHARS.
    budget = max(200, RAW_CHARS // max(1, len(row)))
    return {k: v[:budget] + "…" if isinstance(v, str) and len(v) > budget else v for k, v in row.items()}


def role_values(batch: pa.RecordBatch, spec: RowSpec, normalize: Normalizer) -> dict[str, list]:
    """role -> this batch's values, text roles normalised; an absent optional column reads as nulls."""
    values = {}
    for role, column in spec.columns.items():
        if column not in batch.schema.names:
            values[role] = [None] * batch.num_rows
        elif role == "messages":  # JSON text, or already a list of structs in a hand-written file
            values[role] = normalize_messages(batch.column(column).to_pylist(), normalize)
        elif spec.template == "preference_chat":
            values[role] = preference.chat_values(role, batch.column(column).to_pylist(), normalize)
        else:
            # Ingest writes every column as text; a hand-written file may hold numbers (labels 0/1).
            text = batch.column(column).cast(pa.string())
            values[role] = (text if role in NOT_NORMALISED else normalize(text)).to_pylist()
    return values


def render_batch(batch: pa.RecordBatch, cfg: PreprocessConfig, spec: RowSpec, normalize: Normalizer) -> Iterator[dict | Reject]:
    """One output row or one Reject per input row, in order."""
    name = layout(spec)
    render, learned_part = RENDERERS[name], LEARNED_PART[name]
    values = role_values(batch, spec, normalize)
    for i in range(batch.num_rows):
        row = {role: column[i] for role, column in values.items()}
        # Ingest rejects nulls in required columns; a hand-written sample folder may still hold some.
        missing = next((r for r in spec.columns if row[r] is None and r not in spec.optional), None)
        if missing is not None:
            yield Reject("missing_value", f"{missing} (column '{spec.columns[missing]}') is null")
            continue
        result = render(row, cfg)
        if isinstance(result, Reject):
            yield result
            continue
        out, learned = result
        yield check_lengths(out["text"], learned, learned_part, cfg) or out


def preprocess_split(
    split: str, src: Path | None, dst: Path, rejects: TextIO, cfg: PreprocessConfig, spec: RowSpec, normalize: Normalizer
) -> dict:
    """Render one split batch by batch into `dst`; rejected rows go to the open `rejects` file."""
    schema = pa.schema([(c, pa.string()) for c in OUTPUT_COLUMNS[layout(spec)]])
    stats = {"rows_in": 0, "rows_out": 0, "rows_rejected": 0, "rejected": {}}
    # The writer is opened before the first batch so that an empty split still gets a file with the schema.
    with pq.ParquetWriter(dst, schema) as writer:
        batches = pq.ParquetFile(src).iter_batches(batch_size=BATCH_ROWS) if src is not None else ()
        for batch in batches:
            kept = []
            for i, result in enumerate(render_batch(batch, cfg, spec, normalize)):
                if isinstance(result, Reject):
                    raw = raw_row(batch.slice(i, 1).to_pylist()[0])
                    record = {"split": split, "row": stats["rows_in"] + i, "reason": result.reason, "raw": raw}
                    rejects.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
                    stats["rejected"][result.kind] = stats["rejected"].get(result.kind, 0) + 1
                else:
                    kept.append(result)
            if kept:
                writer.write_table(pa.Table.from_pylist(kept, schema=schema))
            stats["rows_in"] += batch.num_rows
            stats["rows_out"] += len(kept)
    stats["rows_rejected"] = stats["rows_in"] - stats["rows_out"]
    return stats


# ---------------------------------------------------------------- the stage


def content_fingerprint(cfg: PreprocessConfig, spec: RowSpec) -> dict | None:
    """The stop-word list is data, not code, yet it changes the output: hash it when it is used."""
    return {"stopwords_en.txt": stopwords_digest()} if cfg.remove_stopwords else None


def input_files(folder: Path, spec: RowSpec) -> dict[str, Path | None]:
    files = {}
    for split in SPLITS:
        path = folder / f"{split}.parquet"
        if not path.exists():
            if split not in OPTIONAL_SPLITS:
                raise FileNotFoundError(f"{path}: the sample stage writes {', '.join(SPLITS)} .parquet files; this one is missing")
            path = None
        else:
            check_columns(path, spec)
        files[split] = path
    return files


def run(cfg: PreprocessConfig, spec: RowSpec, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    check_templates(cfg, spec)
    files = input_files(Path(inputs["sample"]), spec)  # every split's columns checked before any work
    normalize = make_normalizer(cfg)
    splits = {}
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as rejects:
        for split, src in files.items():
            splits[split] = preprocess_split(split, src, out / f"{split}.parquet", rejects, cfg, spec, normalize)

    train = splits["train"]
    if train["rows_in"] and not train["rows_out"]:
        # Tokenize would fail later with nothing to train on; say why here.
        raise ValueError(f"preprocess rejected all {train['rows_in']} train rows ({train['rejected']}); see {out / 'rejects.jsonl'}")
    rejected: dict[str, int] = {}
    for s in splits.values():
        for kind, n in s["rejected"].items():
            rejected[kind] = rejected.get(kind, 0) + n
    return {
        "rows_in": sum(s["rows_in"] for s in splits.values()),
        "rows_out": sum(s["rows_out"] for s in splits.values()),
        "rows_rejected": sum(s["rows_rejected"] for s in splits.values()),
        "rejected": rejected,
        "splits": splits,
    }
