"""Evaluate the trained model on held-out data, per task, and decide the publish gate.

Run through the pipeline (`tunepipe stage evaluate examples/quickstart.yaml`) or directly:

    run(cfg.evaluate, cfg.model, inputs={"preprocess": pre, "tokenize": tok, "train": trained}, out=out, scratch=tmp)

The task is the tokenize output's (meta.json `task`). metrics.json holds `task`, `gate` and:

    causal_lm       perplexity, eval_loss, eval_tokens on validation; `generations` for sample prompts,
                    answered by the base model and the tuned one side by side when the base is pretrained
    classification  accuracy, macro_f1, eval_loss, per_class counts and a few `examples`, on the
                    held-out split: test if it has rows, else validation
    seq2seq         eval_loss, eval_tokens and rouge_l (ROUGE-L F1 of greedy generations against the
                    references) on the held-out split, a few `generations` listed
    preference      eval_loss (DPO's), rewards/chosen, rewards/rejected, rewards/margins and
                    rewards/accuracies on the held-out pairs (against the reference stage's
                    log-probabilities, at the train's dpo_beta); `generations` as for causal_lm

Every split is scored in batches of 8, up to evaluate.max_batches batches (generations included):
all its rows when they fit, else a fixed random subset of that many (data/loader.py: held_out_batches).
`gate` is {thresholds, passed, failed}: the task's thresholds (evaluate.max_perplexity, min_accuracy,
min_rouge_l, min_reward_accuracy) and a line per one missed; a threshold for another task's metric is listed as
`not_applicable` and does not block. No held-out rows means no measurement, which fails a set gate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from pipeline.evaluate import metrics as M
from pipeline.config import EvaluateConfig, ModelConfig
from pipeline.data.loader import held_out_batches, open_split
from pipeline.evaluate.generation import generate, sample_prompts  # noqa: F401 (generate: part of this module's API)
from pipeline.evaluate.summaries import causal_rouge
from pipeline.registry.bases import model_source
from pipeline.train.modeling import AUTO_CLASSES
from pipeline.train.objectives import preference_loss, reward_metrics

_EVAL_BATCH = 8
GATES = {"max_perplexity": "perplexity", "min_accuracy": "accuracy", "min_rouge_l": "rouge_l", "min_reward_accuracy": "rewards/accuracies"}
"""Gate setting -> the metric it bounds (max_: at most, min_: at least)."""
TASK_GATES = {"causal_lm": ("max_perplexity",), "classification": ("min_accuracy",), "seq2seq": ("min_rouge_l",),
              "preference": ("min_reward_accuracy",)}


def _batches(rows, max_batches: int) -> list[list[int]]:
    return held_out_batches(len(rows), _EVAL_BATCH, max_batches)


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # The last labels.shape[1] positions: prompt tuning puts its virtual tokens in front.
    logits = logits[:, -labels.shape[1] :]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum").item()


def load_tuned(train: Path, task: str, model_cfg: ModelConfig):
    """The trained model in eval mode. An adapters-only save needs its base: the pretrained model,
    or the scratch initialisation train wrote to `base/`."""
    from pipeline.train.methods import load_trained  # imports peft: only when a model is loaded

    base = model_source(model_cfg) if model_cfg.init == "pretrained" else train / "base"
    return load_trained(train / "model", "causal_lm" if task == "preference" else task, base=base)


def held_out_split(tokenized: Path) -> str:
    """`test` if the tokenize output's test split has rows (never used to pick a checkpoint), else `validation`."""
    meta = json.loads((tokenized / "meta.json").read_text())
    return "test" if meta.get("splits", {}).get("test", {}).get("rows") else "validation"


# ---------------------------------------------------------------- causal LM


@torch.no_grad()
def perplexity(model, blocks, max_batches: int) -> tuple[float, int]:
    """(mean loss over label tokens, label token count) over up to max_batches batches.

    `blocks` is any causal-LM loader of `data.loader.open_split` (packed blocks or padded examples).
    """
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for ids in _batches(blocks, max_batches):
        batch = blocks.batch(ids)
        y = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits  # see train/objectives.py: isolates packed examples
        total_loss += _token_loss(logits[:, :-1], y[:, 1:])
        total_tokens += int((y[:, 1:] != -100).sum())
    return total_loss / max(1, total_tokens), total_tokens


def evaluate_causal_lm(cfg: EvaluateConfig, model_cfg: ModelConfig, model, tokenizer, inputs: dict[str, Path]) -> dict:
    loss, tokens = perplexity(model, open_split(inputs["tokenize"] / "validation"), cfg.max_batches)
    # No validation tokens (sample.validation_fraction: 0) means no measurement, not a perfect score.
    ppl = math.exp(min(loss, 50.0)) if tokens else None
    generations = evaluate_causal_generations(cfg, model_cfg, model, tokenizer, inputs["preprocess"])
    rouge = causal_rouge(cfg, model, tokenizer, inputs["preprocess"])
    return {"perplexity": ppl, "eval_loss": loss if tokens else None, "eval_tokens": tokens, "generations": generations, **rouge}


# ---------------------------------------------------------------- classification


@torch.no_grad()
def classify(model, rows, max_batches: int) -> tuple[list[int], list[int], list[int], float]:
    """(row ids scored, true class ids, predicted class ids, summed cross-entropy) over up to max_batches batches."""
    scored, labels, predictions, loss = [], [], [], 0.0
    for ids in _batches(rows, max_batches):
        scored += ids
        batch = rows.batch(ids)
        y = batch.pop("labels")
        logits = model(**batch).logits  # padded per batch: the attention mask keeps pads out
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        labels += y.tolist()
        predictions += logits.argmax(-1).tolist()
    return scored, labels, predictions, loss


def evaluate_classification(cfg: EvaluateConfig, model, tokenizer, tokenized: Path) -> dict:
    split = held_out_split(tokenized)
    rows = open_split(tokenized / split)
    names = rows.label_names or [str(i) for i in range(model.config.num_labels)]
    scored, labels, predictions, loss = classify(model, rows, cfg.max_batches)
    result = {"split": split, "examples": len(labels), "accuracy": None, "macro_f1": None, "eval_loss": None}
    if labels:
        result.update(accuracy=M.accuracy(labels, predictions), macro_f1=M.macro_f1(labels, predictions), eval_loss=loss / len(labels))
    counts = M.class_counts(labels, predictions) if labels else {}
    result["per_class"] = {name: counts.get(i, {"support": 0, "predicted": 0, "correct": 0}) for i, name in enumerate(names)}
    shown = list(range(min(cfg.num_generations, len(labels))))
    texts = [tokenizer.decode(rows.batch([scored[i]])["input_ids"][0], skip_special_tokens=True) for i in shown]
    result["examples_shown"] = [{"text": t, "label": names[labels[i]], "predicted": names[predictions[i]]} for t, i in zip(texts, shown)]
    return result


# ---------------------------------------------------------------- seq2seq


@torch.no_grad()
def seq2seq_scores(model, rows, tokenizer, max_batches: int, max_new_tokens: int) -> dict:
    """Eval loss over target tokens, and greedy generations with their decoded references."""
    loss, tokens, scored, sources, references, predictions = 0.0, 0, [], [], [], []
    for ids in _batches(rows, max_batches):
        scored += ids
        batch = rows.batch(ids)
        y = batch.pop("labels")
        loss += _token_loss(model(**batch, labels=y).logits, y)  # the model shifts labels into decoder inputs
        tokens += int((y != -100).sum())
        predictions += tokenizer.batch_decode(greedy(model, batch, tokenizer, max_new_tokens), skip_special_tokens=True)
        references += [tokenizer.decode(row[row != -100], skip_special_tokens=True) for row in y]
        sources += tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return {"loss": loss, "tokens": tokens, "ids": scored, "sources": sources, "references": references, "predictions": predictions}


def greedy(model, batch: dict, tokenizer, max_new_tokens: int) -> torch.Tensor:
    return model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,  # greedy even where a checkpoint's generation config asks for beams
        pad_token_id=tokenizer.pad_token_id,
    )


def evaluate_seq2seq(cfg: EvaluateConfig, model_cfg: ModelConfig, model, tokenizer, tokenized: Path) -> dict:
    split = held_out_split(tokenized)
    rows = open_split(tokenized / split)
    s = seq2seq_scores(model, rows, tokenizer, cfg.max_batches, cfg.max_new_tokens)
    n = len(s["references"])
    shown = min(cfg.num_generations, n)
    generations = [
        {"source": s["sources"][i], "reference": s["references"][i], "tuned": s["predictions"][i]} for i in range(shown)
    ]
    if model_cfg.init == "pretrained" and shown:
        base = AUTO_CLASSES["seq2seq"].from_pretrained(model_source(model_cfg)).eval()
        with torch.no_grad():
            out = greedy(base, rows.batch(s["ids"][:shown]), tokenizer, cfg.max_new_tokens)
        for sample, text in zip(generations, tokenizer.batch_decode(out, skip_special_tokens=True)):
            sample["base"] = text
    return {
        "split": split,
        "eval_loss": s["loss"] / s["tokens"] if s["tokens"] else None,
        "eval_tokens": s["tokens"],
        "rouge_l": M.rouge_l(s["references"], s["predictions"]) if n else None,
        "rouge_l_examples": n,
        "generations": generations,
    }


# ---------------------------------------------------------------- preference


@torch.no_grad()
def evaluate_preference(cfg: EvaluateConfig, model_cfg: ModelConfig, model, tokenizer, inputs: dict[str, Path]) -> dict:
    """DPO's loss and implicit-reward metrics on the held-out pairs, against the reference stage's
    log-probabilities, at the beta the model was trained with; generations as for a causal LM."""
    tokenized = inputs["tokenize"]
    split = held_out_split(tokenized)
    pairs = open_split(tokenized / split, inputs["reference"])
    beta = json.loads((inputs["train"] / "train_stats.json").read_text())["dpo_beta"]
    loss, counted, sums = 0.0, 0, torch.zeros(3, dtype=torch.float64)
    for ids in held_out_batches(len(pairs), _EVAL_BATCH, cfg.max_batches):
        batch = pairs.batch(ids)
        reference, labels = batch.pop("reference_logps"), batch.pop("labels")
        pair_loss, batch_sums = preference_loss(model(**batch, use_cache=False).logits, labels, reference, beta)
        loss, counted, sums = loss + pair_loss.item(), counted + len(ids), sums + batch_sums
    result = {"split": split, "examples": counted, "dpo_beta": beta, "eval_loss": loss / counted if counted else None}
    result.update({k: (v if counted else None) for k, v in reward_metrics(sums, counted).items()})
    causal = evaluate_causal_generations(cfg, model_cfg, model, tokenizer, inputs["preprocess"])
    return {**result, "generations": causal}


def evaluate_causal_generations(cfg: EvaluateConfig, model_cfg: ModelConfig, model, tokenizer, preprocess: Path) -> list[dict]:
    base = None
    if model_cfg.init == "pretrained" and cfg.num_generations:
        base = AUTO_CLASSES["causal_lm"].from_pretrained(model_source(model_cfg)).eval()
    generations = []
    for prompt, reference in sample_prompts(preprocess / "validation.parquet", tokenizer, cfg.num_generations):
        sample = {"prompt": prompt, "reference": reference, "tuned": generate(model, tokenizer, prompt, cfg.max_new_tokens)}
        if base is not None:
            sample["base"] = generate(base, tokenizer, prompt, cfg.max_new_tokens)
        generations.append(sample)
    return generations


# ---------------------------------------------------------------- the gate and the stage


def judge(cfg: EvaluateConfig, task: str, values: dict) -> dict:
    """The publish gate: every threshold set for this task's metrics must hold."""
    thresholds, not_applicable, failed = {}, {}, []
    for key, metric in GATES.items():
        threshold = getattr(cfg, key)
        if threshold is None:
            continue
        # A causal LM's ROUGE exists only when asked for (evaluate.rouge_rows): then it is gated.
        measured_here = key in TASK_GATES[task] or (task == "causal_lm" and key == "min_rouge_l" and cfg.rouge_rows > 0)
        if not measured_here:
            not_applicable[key] = threshold
            continue
        thresholds[key] = threshold
        value, at_most = values.get(metric), key.startswith("max_")
        if value is None:
            failed.append(f"{metric} was not measured (no held-out rows) but evaluate.{key} is {threshold}")
        elif not math.isfinite(value):  # NaN compares false with everything: `nan > 40` would pass
            failed.append(f"{metric} is {value} (the model diverged), evaluate.{key} is {threshold}")
        elif value > threshold if at_most else value < threshold:
            failed.append(f"{metric} {value:.6g} is not {'<=' if at_most else '>='} evaluate.{key} {threshold}")
    gate = {"thresholds": thresholds, "passed": not failed, "failed": failed}
    return {**gate, "not_applicable": not_applicable} if not_applicable else gate


def run(cfg: EvaluateConfig, model_cfg: ModelConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    torch.manual_seed(0)
    tokenized = inputs["tokenize"]
    task = json.loads((tokenized / "meta.json").read_text()).get("task", "causal_lm")
    tokenizer = AutoTokenizer.from_pretrained(inputs["train"] / "tokenizer")
    model = load_tuned(inputs["train"], task, model_cfg)
    if task == "classification":
        result = evaluate_classification(cfg, model, tokenizer, tokenized)
    elif task == "seq2seq":
        result = evaluate_seq2seq(cfg, model_cfg, model, tokenizer, tokenized)
    elif task == "preference":
        result = evaluate_preference(cfg, model_cfg, model, tokenizer, inputs)
    else:
        result = evaluate_causal_lm(cfg, model_cfg, model, tokenizer, inputs)
    metrics = {"task": task, **result, "gate": judge(cfg, task, result)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))

    headline = ("perplexity", "eval_loss", "eval_tokens", "accuracy", "macro_f1", "rouge_1", "rouge_2", "rouge_l", "split", "examples",
                "rewards/accuracies", "rewards/margins")
    stats = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.items() if k in headline}
    return {"task": task, **stats, "gate_passed": metrics["gate"]["passed"]}
