"""The model card a registry version carries (pipeline/registry/card.py, curves.py), from inputs
built by hand: no training runs here.

    python -m pytest tests/test_model_card.py -q
"""

from __future__ import annotations

import copy
import math
import re

import matplotlib.image
import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from pipeline.registry.card import write_card
from pipeline.registry.curves import write_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHA_CSV = "59464b725bb4e0c3dbcefe9e3af6ffe0441a27aeea471cc7ac41315c767cc056"
SHA_ARROW = "a" * 64
HOSTILE = "a | b\n---\nc <script>alert(1)</script> & d \\| e `f` [x](javascript:alert(1))"


def causal_metrics(**extra) -> dict:
    return {
        "task": "causal_lm",
        "perplexity": 12.345678,
        "eval_loss": 2.5133,
        "eval_tokens": 6519,
        "generations": [
            {"prompt": "### Question:\nHi\n### Answer:\n", "reference": "Hello there", "tuned": "Hello!", "base": "Hmm."},
            {"prompt": "Second?", "reference": "Yes", "tuned": "Yes indeed", "base": "No"},
        ],
        "gate": {"thresholds": {"max_perplexity": 40.0}, "passed": True, "failed": []},
        **extra,
    }


def stage(fingerprint_char: str, content=None) -> dict:
    return {"fingerprint": fingerprint_char * 64, "config": {}, "content": content, "stats": {}}


LINEAGE = {  # dict order scrambled on purpose: the card lists stages in pipeline order
    "evaluate": stage("f"),
    "train": stage("e", {"torch": "2.13.0+cpu", "transformers": "5.24.0"}),
    "ingest": stage("1", [
        {"path": "examples/data/support.csv", "sha256": SHA_CSV, "bytes": 908197},
        {"path": "hf:org/set", "config": None, "split": "train", "revision": None,
         "files": [{"path": "data-00000-of-00001.arrow", "sha256": SHA_ARROW, "bytes": 1234}]},
    ]),
    "sample": stage("2"),
    "tokenize": stage("4"),
    "preprocess": stage("3"),
}
CONFIG = {"data": {"source": "examples/data/support.csv"},
          "train": {"lr": 0.002, "micro_batch_size": 8, "grad_accum_steps": 2, "seed": 0},
          "registry": {"url": "s3://models/registry"}}


def train_log(scale: float = 10.0, steps: int = 60) -> list[dict]:
    return [{"step": i, "loss": scale * math.exp(-i / 20) + 0.5, "lr": 1e-3 * min(1.0, i / 10), "grad_norm": 1.0}
            for i in range(1, steps + 1)]


STATS = {"steps": 60, "method": "lora", "strategy": "ddp", "world_size": 2, "final_loss": 0.55, "trainable_params": 4096,
         "total_params": 1_000_000, "tokens_per_s": 1234.5, "seconds": 12.5,
         "validations": [{"step": 20, "eval_loss": 3.0, "perplexity": 20.1}, {"step": 40, "eval_loss": 1.5}]}


def card(tmp_path, name="card", **overrides) -> tuple[str, list[str]]:
    args = dict(model_name="support-bot", version="3c9172e4ba9d", metrics=causal_metrics(), lineage=LINEAGE, config=CONFIG,
                train_log=train_log(), train_stats=STATS, base={"hub": "gpt2", "revision": None}, method="lora")
    args.update(overrides)
    bundle = tmp_path / name
    bundle.mkdir()
    written = write_card(bundle, **args)
    return (bundle / "README.md").read_text(encoding="utf-8"), written


def split_card(text: str) -> tuple[dict, str]:
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def section(body: str, title: str) -> str:
    return body.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def cells(row: str) -> int:
    """Cells of a markdown table row: pipes not escaped by a backslash (an escaped backslash does not count)."""
    return len(re.findall(r"(?<!\\)(?:\\\\)*\|", row)) - 1


# ---------------------------------------------------------------- front matter


def test_front_matter_parses_with_yaml_and_huggingface_hub(tmp_path):
    text, written = card(tmp_path)
    meta, _ = split_card(text)

    assert written == ["README.md", "curves/loss.png", "curves/lr.png"]
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"tunepipe", "causal_lm", "lora", "text-generation"} <= set(meta["tags"])
    assert meta["datasets"] == ["examples/data/support.csv"]

    data = ModelCard(text).data  # raises on a model-index it cannot read
    assert (data.base_model, data.base_model_relation, data.library_name) == ("gpt2", "adapter", "peft")
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == data.model_name == "support-bot"
    assert {r.metric_type: r.metric_value for r in results} == {"perplexity": 12.345678, "loss": 2.5133}
    expected_dataset = ("text-generation", "validation", "examples/data/support.csv")
    assert {(r.task_type, r.dataset_split, r.dataset_type) for r in results} == {expected_dataset}
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [("perplexity", 12.345678), ("loss", 2.5133)]


REGISTRY_BASE = {"registry": {"model": "support-base", "version": "abc123"}}


@pytest.mark.parametrize(
    "base, method, expected",
    [
        (None, "full", (None, None, "transformers")),  # trained from scratch: no base to name
        ({"hub": "gpt2", "revision": "0123abcd"}, "full", ("gpt2", "finetune", "transformers")),
        ({"hub": "gpt2", "revision": None}, "qlora", ("gpt2", "adapter", "peft")),
        (REGISTRY_BASE, "adapters", ("registry://support-base@abc123", "adapter", "transformers")),
        (REGISTRY_BASE, "prompt_tuning", ("registry://support-base@abc123", "adapter", "peft")),
        ({**REGISTRY_BASE, "url": "s3://other/registry"}, "lora", ("registry://support-base@abc123", "adapter", "peft")),
        ({"path": "/models/minilm"}, "full", (None, None, "transformers")),  # a local folder names nothing to fetch
    ],
)
def test_base_model_and_relation(tmp_path, base, method, expected):
    text, _ = card(tmp_path, base=base, method=method)
    meta, body = split_card(text)
    data = ModelCard(text).data

    assert (meta.get("base_model"), meta.get("base_model_relation"), meta["library_name"]) == expected
    assert (data.base_model, data.library_name) == (expected[0], expected[2])
    summary = body.split("\n## ", 1)[0]
    if base is None:
        assert "from scratch" in summary and "base_model" not in meta and "base_model_relation" not in meta
    elif "hub" in base:
        assert "Hugging Face model `gpt2`" in summary
        assert ("revision `0123abcd`" if base["revision"] else "revision not pinned") in summary
    elif "path" in base:
        assert "on top of the model in the local folder `/models/minilm`" in summary
    else:
        where = "the registry at `s3://other/registry`" if "url" in base else "this registry"
        assert f"version `abc123` of `support-base` in {where}" in summary


def test_classification_metrics_and_split(tmp_path):
    metrics = {"task": "classification", "split": "test", "examples": 48, "accuracy": 0.875, "macro_f1": 0.8123, "eval_loss": 0.41,
               "per_class": {"admin": {"support": 20, "predicted": 22, "correct": 18},
                             "<b>net</b>": {"support": 28, "predicted": 26, "correct": 24}},
               "examples_shown": [{"text": "tool to | manage\nthings", "label": "admin", "predicted": "<b>net</b>"}],
               "gate": {"thresholds": {"min_accuracy": 0.9}, "passed": False,
                        "failed": ["accuracy 0.875 is not >= evaluate.min_accuracy 0.9"]}}
    text, _ = card(tmp_path, metrics=metrics, method="lora")
    meta, body = split_card(text)

    _, results = model_index_to_eval_results(meta["model-index"])
    assert {r.metric_type: r.metric_value for r in results} == {"accuracy": 0.875, "f1": 0.8123, "loss": 0.41}
    assert {(r.task_type, r.dataset_split) for r in results} == {("text-classification", "test")}
    assert meta["pipeline_tag"] == "text-classification"
    evaluation = section(body, "Evaluation")
    assert "| Accuracy | 0.875 | test | ≥ 0.9 (`evaluate.min_accuracy`): failed |" in evaluation
    assert "| Macro F1 | 0.8123 | test | no threshold |" in evaluation
    assert "**Gate: failed.**\n- accuracy 0.875 is not &gt;= evaluate.min\\_accuracy 0.9" in evaluation
    assert "| &lt;b&gt;net&lt;/b&gt; | 28 | 26 | 24 |" in evaluation and "<b>" not in body
    examples = section(body, "Examples")
    assert "| 1 | tool to \\| manage<br>things | admin | &lt;b&gt;net&lt;/b&gt; |" in examples


def test_unmeasured_metrics_stay_out_of_the_model_index(tmp_path):
    metrics = causal_metrics(perplexity=None, eval_loss=None, eval_tokens=0, generations=[])
    text, _ = card(tmp_path, metrics=metrics)
    meta, body = split_card(text)

    assert "model-index" not in meta
    assert ModelCard(text).data.eval_results is None
    assert "| Perplexity | not measured | validation | ≤ 40 (`evaluate.max_perplexity`): failed |" in body
    assert "No sample generations were recorded." in body


def test_seq2seq_generations_and_rouge(tmp_path):
    metrics = {"task": "seq2seq", "split": "validation", "eval_loss": 1.25, "eval_tokens": 300, "rouge_l": 0.4321,
               "generations": [{"source": "translate: hello", "reference": "bonjour", "tuned": "bonjour !"}],
               "gate": {"thresholds": {"min_rouge_l": 0.3}, "passed": True, "failed": []}}
    text, _ = card(tmp_path, metrics=metrics, base={"hub": "t5-small", "revision": None}, method="full")
    meta, body = split_card(text)

    _, results = model_index_to_eval_results(meta["model-index"])
    assert [(r.metric_type, r.metric_value) for r in results] == [("rouge", 0.4321), ("loss", 1.25)]
    assert (meta["pipeline_tag"], meta["base_model_relation"]) == ("text2text-generation", "finetune")
    assert "| ROUGE-L F1 | 0.4321 | validation | ≥ 0.3 (`evaluate.min_rouge_l`): passed |" in body
    assert "| 1 | translate: hello | bonjour | bonjour ! |" in section(body, "Generations")


# ---------------------------------------------------------------- curves


def test_curves_are_pngs_drawn_from_the_data(tmp_path):
    _, written = card(tmp_path, name="a")
    _, same = card(tmp_path, name="b")
    card(tmp_path, name="c", train_log=train_log(scale=3.0))
    card(tmp_path, name="d", train_stats={**STATS, "validations": []})
    loss = {name: (tmp_path / name / "curves" / "loss.png").read_bytes() for name in "abcd"}
    lr = {name: (tmp_path / name / "curves" / "lr.png").read_bytes() for name in "abc"}

    for path in written[1:]:
        raw = (tmp_path / "a" / path).read_bytes()
        assert raw.startswith(PNG_SIGNATURE) and len(raw) > 1024
        assert matplotlib.image.imread(tmp_path / "a" / path).shape[:2] == (350, 600)  # 6 x 3.5 in at 100 dpi
        assert b"Software" not in raw and b"matplotlib" not in raw  # no version noise in the bytes
    assert loss["a"] == loss["b"] and lr["a"] == lr["b"]  # the same run gives the same files
    assert loss["a"] != loss["c"]  # another loss curve, other pixels
    assert loss["a"] != loss["d"]  # the validation points are drawn
    assert lr["a"] == lr["c"]  # the learning rates did not change
    assert "![training loss](curves/loss.png)" in (tmp_path / "a" / "README.md").read_text()
    assert "![learning rate](curves/lr.png)" in (tmp_path / "a" / "README.md").read_text()


def test_curves_skip_values_that_cannot_be_drawn(tmp_path):
    log = [{"step": 1, "loss": float("nan"), "lr": None}, {"step": 2, "loss": None}, "not a row"]
    assert write_curves(tmp_path, log, []) == []
    assert not (tmp_path / "curves").exists()
    assert write_curves(tmp_path, log, [{"step": 5, "eval_loss": 1.0}]) == ["curves/loss.png"]


def test_empty_log_and_missing_stats_still_make_a_card(tmp_path):
    text, written = card(tmp_path, train_log=[], train_stats={}, lineage={}, config={}, base=None, method="full")
    meta, body = split_card(text)

    assert written == ["README.md"]
    assert not (tmp_path / "card" / "curves").exists()
    assert "No training statistics were recorded." in body
    assert "No training curves: the training log of this version is empty." in body
    assert "](curves/" not in body
    assert "datasets" not in meta and ModelCard(text).data.eval_results[0].dataset_name == "unknown"
    assert "The ingest stage recorded no file hashes." in body


# ---------------------------------------------------------------- hostile text


def test_hostile_generation_cannot_break_the_card(tmp_path):
    metrics = causal_metrics()
    metrics["generations"] = [{"prompt": HOSTILE, "reference": "---", "tuned": HOSTILE, "base": "x\r\n---\r\n|"}]
    metrics["gate"]["failed"] = ["<img src=x onerror=alert(1)>"]
    config = copy.deepcopy(CONFIG)
    config["data"]["source"] = ["ok.csv", "evil\n---\nlibrary_name: pwned"]
    text, _ = card(tmp_path, metrics=metrics, config=config)
    meta, body = split_card(text)

    assert meta["library_name"] == "peft"  # the front matter ends where the card ends it
    assert meta["datasets"] == ["ok.csv", "evil\n---\nlibrary_name: pwned"]
    assert ModelCard(text).data.library_name == "peft"
    assert "<script>" not in text and "<img" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; d" in body
    assert not any(line.strip() in ("---", "***", "___") for line in body.splitlines())  # no thematic break, no front matter end
    assert "\\[x\\](javascript:alert(1))" in body  # escaped brackets: no link forms
    table = section(body, "Generations").strip().splitlines()[2:]
    header, rows = table[0], table[2:]
    assert cells(header) == 5 and len(rows) == 1
    assert cells(rows[0]) == 5  # every | from the data is escaped, newlines are <br>
    assert "a \\| b<br>---<br>c" in rows[0]


def test_long_generations_are_cut_in_the_table(tmp_path):
    metrics = causal_metrics()
    metrics["generations"] = [{"prompt": "p" * 5000, "reference": "r", "tuned": "t"}]
    body = split_card(card(tmp_path, metrics=metrics)[0])[1]
    row = section(body, "Generations").strip().splitlines()[-1]

    assert "p" * 400 + " …" in row and "p" * 401 not in row
    assert cells(row) == 4  # no base column when no sample has a base answer


# ---------------------------------------------------------------- lineage and loading


def test_lineage_in_pipeline_order_with_raw_data_hashes(tmp_path):
    body = split_card(card(tmp_path)[0])[1]
    lineage = section(body, "Lineage")
    short_table = lineage.split("### Raw data")[0].splitlines()
    short = [line.split(" | ")[0].strip("| ") for line in short_table if line.startswith("| ") and "`" in line]

    assert short == ["ingest", "sample", "preprocess", "tokenize", "train", "evaluate"]
    assert f"| tokenize | `{'4' * 64}` |" in lineage
    assert f"| examples/data/support.csv | 908,197 | `{SHA_CSV}` |" in lineage
    assert f"| hf:org/set/data-00000-of-00001.arrow | 1,234 | `{SHA_ARROW}` |" in lineage
    assert "Trained with torch `2.13.0+cpu`, transformers `5.24.0`." in lineage


def test_odd_lineage_content_is_shown_defensively(tmp_path):
    lineage = {"ingest": {"fingerprint": None, "content": {"nested": [{"name": "x.csv", "sha256": "b" * 64}], "n": 3}},
               "train": "not a dict", "custom": stage("9", "just a string")}
    body = split_card(card(tmp_path, lineage=lineage)[0])[1]
    text = section(body, "Lineage")

    assert "| ingest | none |" in text and "| custom | `" + "9" * 64 + "` |" in text
    assert f"| x.csv |  | `{'b' * 64}` |" in text


def test_how_to_load(tmp_path):
    body = split_card(card(tmp_path)[0])[1]
    load = section(body, "How to load")

    pull = "tunepipe registry pull support-bot@3c9172e4ba9d ./support-bot-3c9172e4ba9d --registry s3://models/registry --with-base"
    assert pull in load
    assert 'tunepipe generate support-bot@3c9172e4ba9d --registry s3://models/registry --prompt "Hello"' in load
    assert "from pipeline.registry.loading import load_version" in load
    assert "loaded = load_version('s3://models/registry', \"support-bot@3c9172e4ba9d\")\nloaded.model, loaded.tokenizer" in load

    body = split_card(card(tmp_path, name="no-url", config={"registry": {"url": "x y`\n```"}})[0])[1]
    load = section(body, "How to load")
    assert "--registry REGISTRY_URL" in load and "load_version(REGISTRY_URL," in load and "x y" not in load


def test_training_table(tmp_path):
    body = split_card(card(tmp_path)[0])[1]
    training = section(body, "Training")

    for row in ("| Method | `lora` |", "| World size | 2 |", "| Optimizer steps | 60 |", "| Final train loss | 0.55 |",
                "| Best validation loss | 1.5 at step 40 |", "| Tokens per second | 1234.5 |",
                "| Trainable parameters | 4,096 of 1,000,000 (0.41%) |", "| Peak learning rate | 0.002 |",
                "| Micro batch per rank | 8 × 2 accumulation steps |"):
        assert row in training, row
