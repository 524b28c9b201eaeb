"""The evaluate stage per task on tokenize outputs made here, the gate it writes, and publish's refusal.

Models are tiny and built by `build_model`; expected numbers are recomputed in the test one
example at a time (no padding), so a batching, masking or decoding slip in evaluate shows.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tiny import MINILM, TRAIN, VALIDATION, needs_minilm, write_labelled, write_pairs, write_preprocessed
from transformers import AutoTokenizer

from pipeline.data import tokenize
from pipeline.evaluate import stage as evaluate
from pipeline.registry import publish
from pipeline.train import methods
from pipeline.config import EvaluateConfig, build_config
from pipeline.data.loader import open_split
from pipeline.evaluate.metrics import accuracy, macro_f1, rouge_l_pair
from pipeline.train.modeling import build_model

MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "dropout": 0.0}
pytestmark = pytest.mark.usefixtures("one_thread")


def stage_inputs(tmp_path: Path, raw: dict, preprocess: Path, fit=None) -> tuple:
    """Tokenize `preprocess`, build (and with `fit`, train) the model, save it as train does."""
    cfg = build_config({"model": MODEL, **raw})
    tok = tmp_path / "tok"
    tok.mkdir()
    tokenize.run(cfg.tokenize, cfg.model, cfg.row_spec, inputs={"preprocess": preprocess}, out=tok, scratch=tmp_path / "s")
    model = build_model(cfg.model, cfg.task, json.loads((tok / "meta.json").read_text()), seed=0)
    if fit:
        fit(model, open_split(tok / "train"))
    methods.save_trained(model, tmp_path / "train" / "model")
    shutil.copytree(tok / "tokenizer", tmp_path / "train" / "tokenizer")
    return cfg, {"preprocess": preprocess, "tokenize": tok, "train": tmp_path / "train"}, model.eval()


def run_evaluate(tmp_path: Path, cfg, inputs: dict, **settings) -> tuple[dict, dict]:
    out = tmp_path / "eval"
    out.mkdir(exist_ok=True)
    ecfg = cfg.evaluate.model_copy(update=settings)
    stats = evaluate.run(ecfg, cfg.model, inputs=inputs, out=out, scratch=tmp_path / "s")
    return json.loads((out / "metrics.json").read_text()), stats


# ---------------------------------------------------------------- the gate


def test_gate_checks_only_the_task_metric_and_says_what_failed():
    cfg = EvaluateConfig(max_perplexity=10.0, min_accuracy=0.9, min_rouge_l=0.3)
    gate = evaluate.judge(cfg, "classification", {"accuracy": 0.75})
    assert gate == {
        "thresholds": {"min_accuracy": 0.9},
        "passed": False,
        "failed": ["accuracy 0.75 is not >= evaluate.min_accuracy 0.9"],
        "not_applicable": {"max_perplexity": 10.0, "min_rouge_l": 0.3},
    }
    assert evaluate.judge(cfg, "classification", {"accuracy": 0.9})["passed"]
    assert evaluate.judge(cfg, "causal_lm", {"perplexity": 10.0})["passed"]
    assert evaluate.judge(cfg, "causal_lm", {"perplexity": 10.5})["failed"] == ["perplexity 10.5 is not <= evaluate.max_perplexity 10.0"]
    assert evaluate.judge(cfg, "seq2seq", {"rouge_l": None})["failed"] == [
        "rouge_l was not measured (no held-out rows) but evaluate.min_rouge_l is 0.3"
    ]
    assert evaluate.judge(EvaluateConfig(), "seq2seq", {"rouge_l": None}) == {"thresholds": {}, "passed": True, "failed": []}


@pytest.mark.parametrize("task,metric,gate", [("causal_lm", "perplexity", {"max_perplexity": 40.0}),
                                              ("classification", "accuracy", {"min_accuracy": 0.5}),
                                              ("seq2seq", "rouge_l", {"min_rouge_l": 0.1})])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_metric_fails_the_gate_naming_it(task, metric, gate, value):
    """`nan > 40` is False: a diverged run (train.lr=1e6) once passed the gate and was published."""
    result = evaluate.judge(EvaluateConfig(**gate), task, {metric: value})
    assert not result["passed"]
    assert result["failed"] == [f"{metric} is {value} (the model diverged), evaluate.{next(iter(gate))} is {next(iter(gate.values()))}"]


def test_publish_refuses_with_the_metric_and_threshold_that_failed(tmp_path):
    (tmp_path / "evaluate").mkdir()
    gate = evaluate.judge(EvaluateConfig(min_rouge_l=0.4), "seq2seq", {"rouge_l": 0.125})
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps({"task": "seq2seq", "rouge_l": 0.125, "gate": gate}))
    cfg = build_config({})
    with pytest.raises(publish.GateFailed, match=r"\(seq2seq\): rouge_l 0.125 is not >= evaluate.min_rouge_l 0.4; not publishing"):
        publish.run(cfg.registry, cfg.evaluate, cfg.model, inputs={"evaluate": tmp_path / "evaluate"}, out=tmp_path, scratch=tmp_path)


# ---------------------------------------------------------------- per task


def test_causal_lm_perplexity_generations_and_gate(tmp_path):
    source = write_preprocessed(tmp_path / "pre", {"train": TRAIN, "validation": VALIDATION * 3})
    raw = {"tokenize": {"vocab_size": 300, "block_size": 16}, "evaluate": {"num_generations": 2, "max_new_tokens": 3}}
    cfg, inputs, model = stage_inputs(tmp_path, raw, source)
    metrics, stats = run_evaluate(tmp_path, cfg, inputs, max_perplexity=1.0001, min_accuracy=0.5)

    blocks = open_split(inputs["tokenize"] / "validation")
    loss, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(blocks)):
            batch = blocks.batch([i])
            y = batch.pop("labels")[0, 1:]
            logits = model(**batch).logits[0, :-1]
            loss += torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item()
            tokens += int((y != -100).sum())
    assert metrics["task"] == "causal_lm" and metrics["eval_tokens"] == tokens
    assert metrics["perplexity"] == pytest.approx(math.exp(loss / tokens), rel=1e-5)
    assert [g["prompt"] for g in metrics["generations"]] == [VALIDATION[0][0]] * 2 and "base" not in metrics["generations"][0]
    assert metrics["gate"]["thresholds"] == {"max_perplexity": 1.0001} and not metrics["gate"]["passed"]
    assert metrics["gate"]["not_applicable"] == {"min_accuracy": 0.5}
    assert stats["gate_passed"] is False and stats["perplexity"] == round(metrics["perplexity"], 5)
    with pytest.raises(publish.GateFailed, match=r"perplexity [\d.]+ is not <= evaluate.max_perplexity 1.0001"):
        publish.run(cfg.registry, cfg.evaluate, cfg.model, inputs={"evaluate": tmp_path / "eval"}, out=tmp_path, scratch=tmp_path)


TEXTS = ["the router is broken", "pay my bill", "thanks a lot", "bill me twice", "router lights blink", "great service"]
NAMES = ["billing", "billing", "other", "support", "support"]


BERT = pytest.param({"init": "pretrained", "name": str(MINILM)}, marks=needs_minilm, id="minilm")


@pytest.mark.parametrize("model", [pytest.param(MODEL, id="gpt2-scratch"), BERT])
def test_classification_scores_the_test_split_batched_like_one_by_one(tmp_path, model):
    train = [(t, n) for t, n in zip(TEXTS * 2, ["support", "billing", "other", "billing", "support", "other"] * 2)]
    test = [("bill " * (i + 1) + "please", n) for i, n in enumerate(NAMES)]  # varied lengths: batches pad
    source = write_labelled(tmp_path / "pre", {"train": train, "validation": train[:2], "test": test})
    raw = {"task": "classification", "model": model, "tokenize": {"vocab_size": 300, "block_size": 16}, "evaluate": {"num_generations": 2}}
    cfg, inputs, model = stage_inputs(tmp_path, raw, source)
    metrics, stats = run_evaluate(tmp_path, cfg, inputs, min_accuracy=1.0)

    rows = open_split(inputs["tokenize"] / "test")
    with torch.no_grad():  # one at a time: no padding, so no mask needed
        logits = torch.cat([model(input_ids=rows.batch([i])["input_ids"]).logits for i in range(len(rows))])
    predicted = logits.argmax(-1).tolist()
    labels = [0, 0, 1, 2, 2]  # sorted names: billing 0, other 1, support 2
    # The loss sees any change in the logits, even one too small to flip a prediction (a pad attended to).
    assert metrics["eval_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item(), rel=1e-5)
    assert (metrics["task"], metrics["split"], metrics["examples"]) == ("classification", "test", 5)
    assert metrics["accuracy"] == pytest.approx(accuracy(labels, predicted))
    assert metrics["macro_f1"] == pytest.approx(macro_f1(labels, predicted))
    assert {n: c["support"] for n, c in metrics["per_class"].items()} == {"billing": 2, "other": 1, "support": 2}
    assert sum(c["predicted"] for c in metrics["per_class"].values()) == 5
    assert metrics["examples_shown"][0] == {"text": "bill please", "label": "billing", "predicted": ["billing", "other", "support"][predicted[0]]}
    assert metrics["gate"]["passed"] == (metrics["accuracy"] == 1.0) == stats["gate_passed"]


PAIRS = [("good morning", "bonjour"), ("thank you very much", "merci beaucoup"), ("see you", "à bientôt"), ("yes", "oui")]


def overfit(model, rows, steps: int = 60) -> None:
    """Memorise the train pairs, so that generations are worth scoring."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = rows.batch(list(range(len(rows))))
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_seq2seq_loss_rouge_and_generations(tmp_path):
    source = write_pairs(tmp_path / "pre", PAIRS)
    shutil.copy(source / "train.parquet", source / "validation.parquet")
    raw = {"task": "seq2seq", "tokenize": {"vocab_size": 300, "block_size": 16}, "evaluate": {"num_generations": 2, "max_new_tokens": 12}}
    cfg, inputs, model = stage_inputs(tmp_path, raw, source, fit=overfit)
    metrics, stats = run_evaluate(tmp_path, cfg, inputs, min_rouge_l=0.99)

    tokenizer = AutoTokenizer.from_pretrained(inputs["train"] / "tokenizer")
    rows = open_split(inputs["tokenize"] / "validation")
    with torch.no_grad():
        alone = [model.generate(**{k: v for k, v in rows.batch([i]).items() if k != "labels"}, max_new_tokens=12, do_sample=False) for i in range(4)]
    predictions = [tokenizer.decode(g[0], skip_special_tokens=True) for g in alone]
    expected = sum(rouge_l_pair(t, p) for (_, t), p in zip(PAIRS, predictions)) / 4
    assert (metrics["task"], metrics["split"], metrics["rouge_l_examples"]) == ("seq2seq", "validation", 4)
    assert metrics["rouge_l"] == pytest.approx(expected) and metrics["rouge_l"] > 0.5  # it learned the pairs
    assert metrics["eval_tokens"] == sum(len(tokenizer(t)["input_ids"]) + 1 for _, t in PAIRS)  # + eos each
    assert 0 < metrics["eval_loss"] < 1.0
    assert metrics["generations"] == [
        {"source": s, "reference": t, "tuned": p} for (s, t), p in list(zip(PAIRS, predictions))[:2]
    ]
    assert metrics["gate"]["thresholds"] == {"min_rouge_l": 0.99}
    assert metrics["gate"]["passed"] == (metrics["rouge_l"] >= 0.99) == stats["gate_passed"]


def test_prompt_tuned_model_generates_from_a_prompt_longer_than_its_context(tmp_path):
    """A soft prompt takes positions too: generate keeps room for it, not only for the answer.

    The model is built as the recipe builds it for prompt tuning (block + virtual tokens), and
    the prompt is longer than the whole context; without the room, positions run past the table
    (`IndexError: index out of range in self` in evaluate, as `train.method=prompt_tuning` did)."""
    source = write_preprocessed(tmp_path / "pre", {"train": TRAIN, "validation": VALIDATION})
    cfg, inputs, _ = stage_inputs(tmp_path, {"tokenize": {"vocab_size": 300, "block_size": 16}}, source)
    meta = json.loads((inputs["tokenize"] / "meta.json").read_text())
    virtual = 20
    train_cfg = build_config({"train": {"method": "prompt_tuning", "num_virtual_tokens": virtual}}).train
    base = build_model(cfg.model, "causal_lm", dict(meta, block_size=16 + virtual), seed=0)
    model = methods.apply_method(base, train_cfg, "causal_lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(inputs["train"] / "tokenizer")
    prompt = " ".join(row[0] for row in TRAIN * 4)
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > 16 + virtual

    text = evaluate.generate(model, tokenizer, prompt, max_new_tokens=4)

    # The same greedy answer, step by step with full forwards: soft prompt + the prompt's last
    # context - answer - virtual tokens, so every position fits the table.
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    current = ids[:, -(16 + virtual - 4 - virtual):]
    with torch.no_grad():
        for _ in range(4):
            step = model(input_ids=current).logits[:, -1].argmax(-1, keepdim=True)
            current = torch.cat([current, step], dim=1)
            if step.item() == tokenizer.eos_token_id:
                break
    assert text == tokenizer.decode(current[0, 16 - 4:], skip_special_tokens=True)
    with pytest.raises(IndexError):  # what the old room (context - answer) did: the soft prompt pushes past the table
        model(input_ids=ids[:, -(16 + virtual - 4):])
