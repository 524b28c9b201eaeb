"""ROUGE-1/2/L for a causal LM (a summarizer): the metric equals the rouge-score package's, batched
greedy answers equal one-at-a-time ones, and `evaluate.min_rouge_l` gates a causal LM only when
its ROUGE is measured.

    python -m pytest -q tests/test_rouge.py
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny import write_preprocessed

from pipeline.config import build_config
from pipeline.evaluate import metrics as M

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on a mat dog ran fast harbour story part news café don't 42 x The CAT".split()


def test_rouge_equals_the_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    rng = random.Random(0)
    references, predictions = [], []
    for _ in range(500):
        references.append(" ".join(rng.choices(WORDS, k=rng.randint(0, 14))))
        predictions.append(" ".join(rng.choices(WORDS, k=rng.randint(0, 14))))
    theirs = [scorer.score(r, p) for r, p in zip(references, predictions)]
    ours = M.rouge(references, predictions)
    for key, name in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
        assert ours[key] == pytest.approx(sum(s[name].fmeasure for s in theirs) / len(theirs), abs=1e-12), key
    assert 0 < ours["rouge_2"] < ours["rouge_1"]


def test_repeated_ngrams_are_clipped():
    # "the the the" against "the cat": one "the" matches, not three.
    assert M.rouge_n_pair("the cat", "the the the", 1) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert M.rouge_n_pair("", "anything", 1) == 0.0 and M.rouge_n_pair("a b", "a b", 2) == 1.0


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from pipeline.data.text_tokenizer import EOS, train_byte_level_bpe

    texts = [f"Article: story {i} about the harbour and the {w}.\nSummary: the {w} story" for i, w in enumerate(WORDS * 5)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_byte_level_bpe(texts, 300, [EOS]), eos_token=EOS, pad_token=EOS)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=32, n_layer=2, n_head=2)).eval()
    return model, tokenizer


def test_batched_answers_equal_one_at_a_time(tiny_lm):
    from pipeline.evaluate.stage import generate
    from pipeline.evaluate.summaries import generate_batch

    model, tokenizer = tiny_lm
    prompts = ["Article: a", "Article: story 3 about the harbour and the cat.\nSummary:", "x", "the news " * 12]
    assert generate_batch(model, tokenizer, prompts, 12) == [generate(model, tokenizer, p, 12) for p in prompts]


def test_causal_rouge_scores_held_out_rows_and_gates_them(tiny_lm, tmp_path):
    from pipeline.evaluate.stage import generate, judge
    from pipeline.evaluate.summaries import causal_rouge

    model, tokenizer = tiny_lm
    rows = [(f"Article: story {i} about the harbour.\nSummary:", f" the story {i}") for i in range(11)]
    preprocess = write_preprocessed(tmp_path / "pre", {"train": rows, "validation": rows[:5], "test": rows[5:]})
    cfg = build_config(None, ["evaluate.rouge_rows=4", "evaluate.max_new_tokens=6", "evaluate.min_rouge_l=0.9"])
    scores = causal_rouge(cfg.evaluate, model, tokenizer, preprocess)
    assert scores["rouge_examples"] == 4 and scores["rouge_split"] == "test"  # test has rows: it is the held-out split
    # The first 4 test rows, answered greedily one at a time, scored by the metric above.
    answers = [generate(model, tokenizer, p, 6) for p, _ in rows[5:9]]
    expected = M.rouge([r for _, r in rows[5:9]], answers)
    assert {k: scores[k] for k in expected} == pytest.approx(expected)
    assert [s["answer"] for s in scores["rouge_samples"]] == answers[:3]
    gate = judge(cfg.evaluate, "causal_lm", scores)
    assert not gate["passed"] and "rouge_l" in gate["failed"][0] and "min_rouge_l 0.9" in gate["failed"][0]
    # Without rouge_rows a causal LM has no ROUGE: the threshold is not applicable, as before.
    off = build_config(None, ["evaluate.min_rouge_l=0.9"]).evaluate
    assert causal_rouge(off, model, tokenizer, preprocess) == {}
    assert judge(off, "causal_lm", {"perplexity": 3.0}) == {"thresholds": {}, "passed": True, "failed": [],
                                                              "not_applicable": {"min_rouge_l": 0.9}}


def test_a_long_prompt_keeps_its_lead_and_its_end_as_training_truncation_does():
    from pipeline.evaluate.generation import fit_prompt

    assert fit_prompt(list(range(100)), 20) == list(range(15)) + list(range(95, 100))
    assert fit_prompt(list(range(10)), 20) == list(range(10))
    assert fit_prompt(list(range(10)), 3) == [0, 1, 2]


def test_the_baselines_are_scored_like_the_answers():
    from pipeline.evaluate.summaries import baselines

    prompts = ["alpha beta gamma delta\nTL;DR: ", "one two three four five\nTL;DR: "]
    found = baselines(prompts, ["alpha beta", "one two three"])
    assert found["lead"]["rouge_1"] == 1.0 and found["lead"]["rouge_l"] == 1.0
    assert found["another_rows_summary"]["rouge_1"] == 0.0
