"""ROUGE for a causal LM: answers generated after each held-out prompt, scored against its response.

    scores = causal_rouge(cfg, model, tokenizer, inputs["preprocess"])   # {} when evaluate.rouge_rows is 0

A summarizer tuned as a causal LM (prompt: the article in its template; response: the summary) is
judged like a seq2seq one: greedy answers for up to `evaluate.rouge_rows` rows of the held-out split
(test when it has rows, else validation), in batches of 8, left-padded so every answer starts right
after its own prompt, and ROUGE-1, ROUGE-2 and ROUGE-L F1 averaged over the rows (metrics.rouge,
equal to the rouge-score package's, tested), with the same scores for two baselines (`baselines`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.config import EvaluateConfig
from pipeline.evaluate import metrics as M
from pipeline.evaluate.generation import fit_prompt, generate, sample_prompts
from pipeline.train.methods.prompt_tuning import virtual_tokens

BATCH = 8


def held_out_rows(preprocess: Path) -> Path:
    test = preprocess / "test.parquet"
    return test if test.is_file() and pq.ParquetFile(test).metadata.num_rows else preprocess / "validation.parquet"


def causal_rouge(cfg: EvaluateConfig, model, tokenizer, preprocess: Path) -> dict:
    if not cfg.rouge_rows:
        return {}
    split = held_out_rows(preprocess)
    pairs = sample_prompts(split, tokenizer, cfg.rouge_rows) if split.is_file() else []
    if not pairs:
        return {"rouge_1": None, "rouge_2": None, "rouge_l": None, "rouge_examples": 0}
    answers: list[str] = []
    for start in range(0, len(pairs), BATCH):
        answers += generate_batch(model, tokenizer, [p for p, _ in pairs[start : start + BATCH]], cfg.max_new_tokens)
    references = [r for _, r in pairs]
    scores = M.rouge(references, answers)
    shown = [{"prompt": p, "reference": r, "answer": a} for (p, r), a in list(zip(pairs, answers))[:3]]
    return {**scores, "rouge_examples": len(pairs), "rouge_split": split.stem, "rouge_samples": shown,
            "rouge_baselines": baselines([p for p, _ in pairs], references)}


def baselines(prompts: list[str], references: list[str]) -> dict[str, dict[str, float]]:
    """What a summarizer must beat, scored like it. `another_rows_summary`: every row answered with
    the next row's reference (trivial: on-topic words, wrong facts). `lead`: the prompt's first as
    many words as the reference has (the classic news baseline, strong on CNN/DailyMail)."""
    others = references[1:] + references[:1]
    leads = [" ".join(p.split()[: len(r.split())]) for p, r in zip(prompts, references)]
    return {"another_rows_summary": M.rouge(references, others) if len(references) > 1 else None,
            "lead": M.rouge(references, leads)}


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to several prompts at once, the same tokens as one at a time (tested)."""
    if virtual_tokens(model):
        # PEFT's soft prompt and left padding do not mix (it prepends the prompt to pads); one by one.
        return [generate(model, tokenizer, prompt, max_new_tokens) for prompt in prompts]
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)
    max_new_tokens = max(1, min(max_new_tokens, limit - 1))
    encoded = [fit_prompt(tokenizer(p, add_special_tokens=False)["input_ids"], limit - max_new_tokens) or [tokenizer.eos_token_id]
               for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    model.eval()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
