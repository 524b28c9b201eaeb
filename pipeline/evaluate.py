"""Evaluate the trained model: validation perplexity on the held-out blocks and sample generations.

With a pretrained base (`model.init: pretrained`), each sample prompt is answered by the base
model and by the tuned one side by side, so a reviewer sees what fine-tuning changed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import EvaluateConfig, ModelConfig
from pipeline.data_loader import open_split

_EVAL_BATCH = 8


@torch.no_grad()
def perplexity(model, blocks, max_batches: int) -> tuple[float, int]:
    """(mean loss over label tokens, label token count) over up to max_batches batches, in order.

    `blocks` is any causal-LM loader of `data_loader.open_split` (packed blocks or padded examples).
    """
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for b in range(min(max_batches, math.ceil(len(blocks) / _EVAL_BATCH))):
        ids = range(b * _EVAL_BATCH, min(len(blocks), (b + 1) * _EVAL_BATCH))
        batch = blocks.batch(list(ids))
        y = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits  # see train.py: isolates packed examples
        total_loss += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        ).item()
        total_tokens += int((y[:, 1:] != -100).sum())
    return total_loss / max(1, total_tokens), total_tokens


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    ids = ids[:, -max(1, limit - max_new_tokens) :]  # keep room for the answer inside the context
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,  # greedy: generations are reproducible and comparable across versions
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def sample_prompts(path: Path, tokenizer, count: int) -> list[tuple[str, str]]:
    """(prompt, reference answer) pairs from the preprocessed validation split.

    Prompt/response layouts give them directly (rows with an empty prompt, as the `text` template
    makes, have nothing to answer). A chat gives the conversation up to its last assistant turn,
    rendered with the generation prompt, and that turn as the reference.
    """
    columns = pq.ParquetFile(path).schema_arrow.names
    pairs: list[tuple[str, str]] = []
    if "prompt" in columns:
        for row in pq.read_table(path, columns=["prompt", "response"]).to_pylist():
            if row["prompt"] and len(pairs) < count:
                pairs.append((row["prompt"], row["response"]))
    elif "messages" in columns:
        for text in pq.read_table(path, columns=["messages"])["messages"].to_pylist()[:count]:
            messages = json.loads(text)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
            pairs.append((prompt, messages[last]["content"]))
    return pairs


def run(cfg: EvaluateConfig, model_cfg: ModelConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    torch.manual_seed(0)
    trained = inputs["train"]
    tokenizer = AutoTokenizer.from_pretrained(trained / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(trained / "model")
    loss, tokens = perplexity(model, open_split(inputs["tokenize"] / "validation"), cfg.max_batches)
    # No validation tokens (sample.validation_fraction: 0) means no measurement, not a perfect score.
    ppl = math.exp(min(loss, 50.0)) if tokens else None
    loss = loss if tokens else None

    base = None
    if model_cfg.init == "pretrained" and cfg.num_generations:
        base = AutoModelForCausalLM.from_pretrained(model_cfg.name).eval()
    generations = []
    for prompt, reference in sample_prompts(inputs["preprocess"] / "validation.parquet", tokenizer, cfg.num_generations):
        sample = {"prompt": prompt, "reference": reference, "tuned": generate(model, tokenizer, prompt, cfg.max_new_tokens)}
        if base is not None:
            sample["base"] = generate(base, tokenizer, prompt, cfg.max_new_tokens)
        generations.append(sample)

    passed = cfg.max_perplexity is None or (ppl is not None and ppl <= cfg.max_perplexity)
    metrics = {
        "perplexity": ppl,
        "eval_loss": loss,
        "eval_tokens": tokens,
        "gate": {"max_perplexity": cfg.max_perplexity, "passed": passed},
        "generations": generations,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    rounded = lambda x, n: None if x is None else round(x, n)  # noqa: E731
    return {"perplexity": rounded(ppl, 4), "eval_loss": rounded(loss, 5), "eval_tokens": tokens, "gate_passed": passed}
