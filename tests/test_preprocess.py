import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import read_rejects

from pipeline import stages
from pipeline.data import preprocess
from pipeline.artifacts import Artifact
from pipeline.config import ConfigError, build_config


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    # Two rows a batch, so every test also crosses batch boundaries (row numbers, writer appends).
    monkeypatch.setattr(preprocess, "BATCH_ROWS", 2)


def write_sample(folder: Path, splits: dict[str, list[dict]], types: dict[str, pa.DataType] = {}) -> Path:
    """A sample-stage folder: one parquet file per split, every column text unless `types` says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    some_row = next(rows[0] for rows in splits.values() if rows)
    for split, rows in splits.items():
        names = list(rows[0] if rows else some_row)  # an empty split has the columns of the others
        table = pa.table({n: pa.array([r.get(n) for r in rows], types.get(n, pa.string())) for n in names})
        pq.write_table(table, folder / f"{split}.parquet")
    return folder


def run_preprocess(tmp_path: Path, raw: dict, splits: dict[str, list[dict]], types={}) -> tuple[Path, dict]:
    cfg = build_config(raw)
    sample = write_sample(tmp_path / "sample", splits, types)
    out = tmp_path / "out"
    out.mkdir()
    stats = preprocess.run(cfg.preprocess, cfg.row_spec, inputs={"sample": sample}, out=out, scratch=tmp_path / "scratch")
    return out, stats


def rows(out: Path, split: str = "train") -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


QA = {
    "train": [
        {"question": "How do I reset it?", "answer": "Hold the button.", "id": "0"},
        {"question": "Où est-il?", "answer": "Ici, 日本.", "id": "1"},
        {"question": "", "answer": "empty prompt", "id": "2"},
    ],
    "validation": [{"question": "Refund?", "answer": "Within 30 days.", "id": "3"}],
    "test": [{"question": "Hours?", "answer": "9 to 5.", "id": "4"}],
}


def test_prompt_response_templates_and_stats(tmp_path):
    raw = {
        "data": {"prompt_column": "question", "response_column": "answer"},
        "preprocess": {"prompt_template": "Q: {prompt}\nA: ", "response_template": "{response} {{done}}"},
    }
    out, stats = run_preprocess(tmp_path, raw, QA)

    train = pq.read_table(out / "train.parquet")
    assert train.column_names == ["prompt", "response", "text"]
    assert train.to_pylist()[1] == {"prompt": "Q: Où est-il?\nA: ", "response": "Ici, 日本. {done}", "text": "Q: Où est-il?\nA: Ici, 日本. {done}"}
    assert rows(out)[2]["prompt"] == "Q: \nA: "  # an empty prompt is allowed; only the learned part is checked
    assert [r["text"] for r in rows(out, "test")] == ["Q: Hours?\nA: 9 to 5. {done}"]
    one = {"rows_in": 1, "rows_out": 1, "rows_rejected": 0, "rejected": {}}
    assert stats == {
        "rows_in": 5,
        "rows_out": 5,
        "rows_rejected": 0,
        "rejected": {},
        "splits": {"train": {**one, "rows_in": 3, "rows_out": 3}, "validation": one, "test": one},
    }
    assert (out / "rejects.jsonl").read_text() == ""


INSTRUCTIONS = [
    {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
    {"instruction": "Say hi.", "input": "   ", "output": "Hi"},
    {"instruction": "Count.", "input": None, "output": "1 2 3"},
]


def test_instruction_template_with_and_without_input(tmp_path):
    raw = {
        "preprocess": {
            "template": "instruction",
            "instruction_template": "I: {instruction} | In: {input} | R: ",
            "instruction_template_no_input": "I: {instruction} | R: ",
        }
    }
    out, stats = run_preprocess(tmp_path, raw, {"train": INSTRUCTIONS, "validation": INSTRUCTIONS[:1]})

    assert rows(out) == [
        {"prompt": "I: Translate. | In: Bonjour | R: ", "response": "Hello", "text": "I: Translate. | In: Bonjour | R: Hello"},
        {"prompt": "I: Say hi. | R: ", "response": "Hi", "text": "I: Say hi. | R: Hi"},  # blank input: no input section
        {"prompt": "I: Count. | R: ", "response": "1 2 3", "text": "I: Count. | R: 1 2 3"},
    ]
    assert stats["rows_out"] == 4


def test_instruction_input_column_may_be_absent(tmp_path):
    table = [{k: v for k, v in row.items() if k != "input"} for row in INSTRUCTIONS]
    out, _ = run_preprocess(tmp_path, {"preprocess": {"template": "instruction"}}, {"train": table, "validation": []})
    assert rows(out)[0]["prompt"] == "### Instruction:\nTranslate.\n\n### Response:\n"


def test_text_template_learns_everything(tmp_path):
    out, _ = run_preprocess(tmp_path, {"preprocess": {"template": "text"}}, {"train": [{"text": "Once upon a time."}], "validation": []})
    assert rows(out) == [{"prompt": "", "response": "Once upon a time.", "text": "Once upon a time."}]


def test_chat_canonical_messages_and_sharegpt_mapping(tmp_path):
    chat = [
        {"role": "system", "content": "Be brief.", "name": "sys"},  # extra keys are dropped
        {"role": "user", "content": "Hi, ça va?"},
        {"role": "assistant", "content": "Oui."},
    ]
    sharegpt = [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    table = [{"messages": json.dumps(chat)}, {"messages": json.dumps(sharegpt)}]
    out, _ = run_preprocess(tmp_path, {"preprocess": {"template": "chat"}}, {"train": table, "validation": []})

    got = rows(out)
    assert pq.read_schema(out / "train.parquet").names == ["messages", "text"]
    assert got[0]["messages"] == (
        '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, ça va?"}, '
        '{"role": "assistant", "content": "Oui."}]'
    )  # canonical: role and content only, non-ASCII kept as is
    assert got[0]["text"] == "Be brief.\nHi, ça va?\nOui."
    assert json.loads(got[1]["messages"]) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


@pytest.mark.parametrize(
    "messages, reason",
    [
        ('[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]', "message 2: role 'bot' is not system/user/assistant"),
        ('[{"from": "human", "value": "a"}, {"from": "model", "value": "b"}]', "message 2: from 'model' is not human/gpt/system"),
        ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]', "message 2: content must be a string, got a number"),
        ('[{"role": "assistant", "content": "a"}, "hello"]', "message 2: expected an object, got a string"),
        ('[{"speaker": "user", "text": "a"}]', "message 1: needs the keys role and content (or ShareGPT's from and value), has ['speaker', 'text']"),
        ('[{"role": "user", "content": "a"}]', "no assistant message among 1: nothing to learn"),
        ('{"role": "assistant", "content": "a"}', "expected a JSON list of messages, got an object"),
        ('[{"role": "user"', "not valid JSON (Expecting ',' delimiter at line 1 column 17)"),
    ],
)
def test_chat_validation_rejects_with_a_precise_reason(tmp_path, messages, reason):
    good = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    table = [{"messages": good}, {"messages": messages}]
    out, stats = run_preprocess(tmp_path, {"preprocess": {"template": "chat"}}, {"train": table, "validation": []})

    assert len(rows(out)) == 1
    assert stats["splits"]["train"]["rejected"] == {"invalid_messages": 1}
    assert read_rejects(out) == [{"split": "train", "row": 1, "reason": f"invalid_messages: {reason}", "raw": {"messages": messages}}]


def test_classification_keeps_the_label_as_a_stripped_string(tmp_path):
    raw = {"task": "classification", "preprocess": {"lowercase": True, "strip_punctuation": True}}
    table = [{"text": "GREAT product!", "label": " Positive "}, {"text": "Meh.", "label": "Neg-ative"}, {"text": "ok", "label": "  "}]
    out, stats = run_preprocess(tmp_path, raw, {"train": table, "validation": []})

    assert pq.read_schema(out / "train.parquet").names == ["text", "label"]
    assert rows(out) == [{"text": "great product", "label": "Positive"}, {"text": "meh", "label": "Neg-ative"}]
    assert stats["splits"]["train"]["rejected"] == {"missing_value": 1}
    assert read_rejects(out)[0]["reason"] == "missing_value: the label is blank"


def test_classification_numeric_labels_become_text(tmp_path):
    table = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    out, _ = run_preprocess(tmp_path, {"task": "classification"}, {"train": table, "validation": []}, types={"label": pa.int64()})
    assert [r["label"] for r in rows(out)] == ["1", "0"]


def test_seq2seq_columns(tmp_path):
    raw = {"task": "seq2seq", "data": {"text_column": "article", "target_column": "summary"}, "preprocess": {"collapse_whitespace": True}}
    table = [{"article": " A long\n\narticle. ", "summary": "Short. "}]
    out, _ = run_preprocess(tmp_path, raw, {"train": table, "validation": []})
    assert rows(out) == [{"source": "A long article.", "target": "Short.", "text": "A long article.\nShort."}]


def test_normalisation_touches_values_never_templates(tmp_path):
    flags = {"unicode_nfc": True, "lowercase": True, "strip_punctuation": True, "strip_digits": True, "collapse_whitespace": True}
    table = [{"prompt": "Cafe\u0301 OPEN?  Since 1999!", "response": "Yes,\n9 TO 5."}]
    out, _ = run_preprocess(tmp_path, {"preprocess": flags}, {"train": table, "validation": []})
    assert rows(out) == [
        {
            "prompt": "### Question:\ncafé open since\n### Answer:\n",
            "response": "yes to",
            "text": "### Question:\ncafé open since\n### Answer:\nyes to",
        }
    ]


def test_normalisation_reaches_instruction_input_and_message_contents(tmp_path):
    flags = {"preprocess": {"template": "instruction", "lowercase": True, "remove_stopwords": True}}
    out, _ = run_preprocess(tmp_path, flags, {"train": [{"instruction": "Fix THE bug", "input": "In the code", "output": "Done, the end"}], "validation": []})
    assert rows(out)[0] == {
        "prompt": "### Instruction:\nfix bug\n\n### Input:\ncode\n\n### Response:\n",
        "response": "done, end",
        "text": "### Instruction:\nfix bug\n\n### Input:\ncode\n\n### Response:\ndone, end",
    }

    flags = {"preprocess": {"template": "chat", "lowercase": True}}
    chat = json.dumps([{"role": "user", "content": "HELLO"}, {"role": "assistant", "content": "HI There"}])
    out, _ = run_preprocess(tmp_path / "chat", flags, {"train": [{"messages": chat}], "validation": []})
    assert json.loads(rows(out)[0]["messages"]) == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    assert rows(out)[0]["text"] == "hello\nhi there"


def test_length_filters_count_and_explain_rejects(tmp_path):
    raw = {"preprocess": {"min_chars": 3, "max_chars": 60, "strip_punctuation": True}}
    long_prompt = "word " * 200
    table = [
        {"prompt": "a", "response": "fine", "id": "0"},
        {"prompt": "b", "response": "?!.", "id": "1"},  # 0 characters once punctuation goes
        {"prompt": long_prompt, "response": "long enough", "id": "2"},
        {"prompt": "c", "response": "ok", "id": "3"},
        {"prompt": "d", "response": "also fine", "id": "4"},
    ]
    out, stats = run_preprocess(tmp_path, raw, {"train": table, "validation": [{"prompt": "e", "response": "no", "id": "5"}]})

    assert [r["response"] for r in rows(out)] == ["fine", "also fine"]
    assert stats["splits"]["train"] == {"rows_in": 5, "rows_out": 2, "rows_rejected": 3, "rejected": {"too_short": 2, "too_long": 1}}
    assert stats["splits"]["validation"] == {"rows_in": 1, "rows_out": 0, "rows_rejected": 1, "rejected": {"too_short": 1}}
    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (6, 2, 4)
    assert stats["rejected"] == {"too_short": 3, "too_long": 1}

    got = read_rejects(out)
    assert [(r["split"], r["row"], r["reason"].split(":")[0]) for r in got] == [
        ("train", 1, "too_short"),
        ("train", 2, "too_long"),
        ("train", 3, "too_short"),
        ("validation", 0, "too_short"),
    ]
    assert got[0]["reason"] == "too_short: response has 0 characters after normalisation; preprocess.min_chars is 3"
    assert got[0]["raw"] == {"prompt": "b", "response": "?!.", "id": "1"}  # the input row as read, not normalised
    text_chars = len("### Question:\n" + long_prompt + "\n### Answer:\n" + "long enough")
    assert got[1]["reason"] == f"too_long: text has {text_chars} characters; preprocess.max_chars is 60"
    # A long value is cut to its share of the raw budget, marked with an ellipsis.
    assert got[1]["raw"]["prompt"] == long_prompt[: preprocess.RAW_CHARS // 3] + "…"
    assert got[1]["raw"]["id"] == "2"


def test_null_in_a_required_column_is_rejected(tmp_path):
    out, stats = run_preprocess(tmp_path, {}, {"train": [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": None}], "validation": []})
    assert stats["splits"]["train"]["rejected"] == {"missing_value": 1}
    assert read_rejects(out)[0]["reason"] == "missing_value: response (column 'response') is null"


def test_empty_and_missing_splits_get_files_with_the_schema(tmp_path):
    sample = {"train": [{"prompt": "p", "response": "r"}], "validation": []}  # and no test.parquet, as older samples
    out, stats = run_preprocess(tmp_path, {}, sample)

    for split in ("validation", "test"):
        table = pq.read_table(out / f"{split}.parquet")
        assert (table.num_rows, table.column_names) == (0, ["prompt", "response", "text"])
        assert stats["splits"][split] == {"rows_in": 0, "rows_out": 0, "rows_rejected": 0, "rejected": {}}


def test_missing_train_split_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.parquet"):
        run_preprocess(tmp_path, {}, {"validation": [{"prompt": "p", "response": "r"}]})


def test_rejecting_every_train_row_fails_the_stage(tmp_path):
    with pytest.raises(ValueError, match=r"rejected all 2 train rows \({'too_short': 2}\)"):
        run_preprocess(tmp_path, {"preprocess": {"min_chars": 50}}, {"train": [{"prompt": "p", "response": "r"}] * 2, "validation": []})


@pytest.mark.parametrize(
    "key, template, message",
    [
        ("prompt_template", "{prompt} with {context}", "template names {context}, but only {prompt} is available"),
        ("prompt_template", "Q: {}", "{}"),
        ("response_template", "{prompt}{response}", "{prompt}"),
        ("prompt_template", "Q: {prompt", "literal braces"),
        ("instruction_template", "{instruction} {context}", "only {instruction} and {input} are available"),
        ("instruction_template_no_input", "{instruction} {input}", "only {instruction} is available"),
    ],
)
def test_bad_template_fails_before_reading_data(tmp_path, key, template, message):
    template_name = "instruction" if key.startswith("instruction") else "prompt_response"
    cfg = build_config({"preprocess": {"template": template_name, key: template}})
    out = tmp_path / "out"
    out.mkdir()
    # No sample folder at all: the check must come before any file is opened.
    with pytest.raises(ConfigError, match=f"preprocess.{key}") as error:
        preprocess.run(cfg.preprocess, cfg.row_spec, inputs={"sample": tmp_path / "nowhere"}, out=out, scratch=tmp_path)
    assert message in str(error.value)
    assert list(out.iterdir()) == []


def test_templates_of_another_layout_are_not_checked(tmp_path):
    raw = {"preprocess": {"template": "text", "prompt_template": "{unused}"}}
    out, _ = run_preprocess(tmp_path, raw, {"train": [{"text": "t"}], "validation": []})
    assert rows(out)[0]["text"] == "t"


def test_missing_column_names_the_column_the_key_and_the_columns(tmp_path):
    sample = {"train": [{"prompt": "p", "response": "r"}], "validation": [{"question": "p", "response": "r"}]}
    with pytest.raises(ValueError) as error:
        run_preprocess(tmp_path, {}, sample)
    message = str(error.value)
    assert "validation.parquet: no column 'prompt'" in message
    assert "data.prompt_column" in message and "['question', 'response']" in message
    assert list((tmp_path / "out").iterdir()) == []  # checked for every split before any output


def test_content_fingerprint_covers_the_stopword_list_only_when_used():
    cfg = build_config({})
    assert preprocess.content_fingerprint(cfg.preprocess, cfg.row_spec) is None
    cfg = build_config({"preprocess": {"remove_stopwords": True}})
    assert len(preprocess.content_fingerprint(cfg.preprocess, cfg.row_spec)["stopwords_en.txt"]) == 64


def test_materialize_commits_then_reuses(tmp_path):
    cfg = build_config({"preprocess": {"prompt_template": "<{prompt}>"}})
    sample = write_sample(tmp_path / "sample", {s: [{"prompt": "How do I reset it?", "response": "Hold."}] for s in ("train", "validation", "test")})
    parents = {"sample": Artifact("sample", "fp", str(sample))}

    first = stages.materialize("preprocess", cfg, parents, workdir=str(tmp_path / "runs"), log=lambda _: None)
    second = stages.materialize("preprocess", cfg, parents, workdir=str(tmp_path / "runs"), log=lambda _: None)

    assert (first.status, second.status) == ("ran", "cached")
    assert second.stats["rows_out"] == 3
    manifest = json.loads((Path(first.output) / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["rejects.jsonl", "test.parquet", "train.parquet", "validation.parquet"]
    assert pq.read_table(Path(first.output) / "train.parquet").column("prompt")[0].as_py() == "<How do I reset it?>"
