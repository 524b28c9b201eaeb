"""Greedy answers of a causal LM to prompts, and the held-out prompts evaluate answers.

    generate(model, tokenizer, "### Question:\nhi\n### Answer:\n", max_new_tokens=40)
    sample_prompts(preprocess / "validation.parquet", tokenizer, count=3)   # [(prompt, reference), ...]
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.train.methods.prompt_tuning import virtual_tokens


def fit_prompt(ids: list[int], room: int) -> list[int]:
    """A prompt cut to `room` tokens as tokenize's `prompt` truncation cuts one in training: its
    first three quarters and last quarter kept, the middle dropped. A long article keeps its lead
    (where news puts the facts) and its template's end ("TL;DR:"), which a left cut would lose."""
    if len(ids) <= room:
        return ids
    tail = room // 4
    return ids[: room - tail] + (ids[-tail:] if tail else [])


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    # Keep room inside the position table for the answer, and for a soft prompt's virtual tokens;
    # an answer longer than the table allows is cut to fit (else an IndexError in the embedding).
    virtual = virtual_tokens(model)
    max_new_tokens = max(1, min(max_new_tokens, limit - virtual - 1))
    ids = torch.tensor([fit_prompt(ids, max(1, limit - max_new_tokens - virtual))])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,  # greedy: generations are reproducible and comparable across versions
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # A soft prompt: PEFT 0.21 under transformers 5 hands the model no KV cache after the first
        # step and prepends the soft prompt again at every step (positions 28..48 for a 1-token
        # step, seen on GPT-2). Without a cache every step re-reads soft prompt + context: correct.
        use_cache=not virtual,
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
    answer = "chosen" if "chosen" in columns else "response"  # preference pairs: the chosen answer is the reference
    if "prompt" in columns:
        for row in pq.read_table(path, columns=["prompt", answer]).to_pylist():
            if row["prompt"] and len(pairs) < count:
                pairs.append((row["prompt"], row[answer]))
    elif "messages" in columns and answer == "chosen":  # a preference chat: messages are the prompt
        for row in pq.read_table(path, columns=["messages", answer]).to_pylist()[:count]:
            prompt = tokenizer.apply_chat_template(json.loads(row["messages"]), tokenize=False, add_generation_prompt=True)
            pairs.append((prompt, row[answer]))
    elif "messages" in columns:
        for text in pq.read_table(path, columns=["messages"])["messages"].to_pylist()[:count]:
            messages = json.loads(text)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
            pairs.append((prompt, messages[last]["content"]))
    return pairs
