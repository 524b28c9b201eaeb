"""`tokenize.truncation: prompt`: a long article loses the middle of its prompt, never its summary.

    python -m pytest -q tests/test_truncation_prompt.py
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny import examples_of, load_split, run_tokenize

from pipeline.config import ConfigError, build_config
from pipeline.data.packing import IGNORE_INDEX, Ragged, offsets_of, truncate


def ragged(parts: list[tuple[int, int]]) -> Ragged:
    """Examples of (prompt tokens, learned tokens), numbered so every token is distinct."""
    lengths = np.array([p + r for p, r in parts])
    labels = np.concatenate([np.r_[np.full(p, IGNORE_INDEX), np.ones(r)] for p, r in parts]).astype(np.int32)
    return Ragged(np.arange(lengths.sum(), dtype=np.int32), labels, offsets_of(lengths))


def test_the_middle_of_the_prompt_goes_and_the_response_stays():
    cut = truncate(ragged([(10, 4), (3, 2), (2, 9)]), 8, "prompt")
    assert (cut.truncated, cut.dropped) == (1, 1)  # the third's response alone (9) does not fit in 8: dropped
    first, second = np.split(cut.kept.ids, cut.kept.offsets[1:-1])
    # Room for 4 prompt tokens: its first 3 (the instruction) and last 1 (the answer marker), then all 4 learned.
    assert first.tolist() == [0, 1, 2, 9, 10, 11, 12, 13]
    assert second.tolist() == [14, 15, 16, 17, 18]


def test_random_examples_keep_every_learned_token_and_fit():
    rng = np.random.default_rng(0)
    parts = [(int(rng.integers(0, 60)), int(rng.integers(1, 30))) for _ in range(500)]
    examples = ragged(parts)
    cut = truncate(examples, 32, "prompt")
    kept_parts = [(p, r) for p, r in parts if r <= 32]
    assert len(cut.kept) == len(kept_parts) and cut.dropped == len(parts) - len(kept_parts)
    assert cut.truncated == sum(p + r > 32 for p, r in kept_parts)
    originals = [e for e, (p, r) in zip(np.split(examples.ids, examples.offsets[1:-1]), parts) if r <= 32]
    for (p, r), kept, original in zip(kept_parts, np.split(cut.kept.ids, cut.kept.offsets[1:-1]), originals):
        assert len(kept) == min(p + r, 32)
        assert kept[-r:].tolist() == original[-r:].tolist()  # the whole response, in order
        assert kept[: min(p, 1)].tolist() == original[: min(p, 1)].tolist()  # the prompt's start survives
        assert set(kept.tolist()) <= set(original.tolist()) and np.all(np.diff(kept) > 0)  # a subsequence


def test_the_tokenize_stage_keeps_summaries_whole(tmp_path):
    article = " ".join(f"sentence {i} of a long news article about the harbour." for i in range(40))
    rows = [(f"Article: {article} {k}\nSummary:", f" the harbour story, part {k}.") for k in range(6)]
    raw = {"tokenize": {"vocab_size": 300, "block_size": 48, "packing": "none", "truncation": "prompt"}}
    out, stats = run_tokenize(tmp_path, raw, {"train": rows, "validation": rows[:2]})
    assert stats["splits"]["train"]["truncated"] == 6 and stats["splits"]["train"]["dropped"] == 0
    ids, labels, offsets = load_split(out, "train", "input_ids", "labels", "offsets")
    right_out, _ = run_tokenize(tmp_path, {"tokenize": {**raw["tokenize"], "truncation": "right"}}, {"train": rows, "validation": rows[:2]},
                                name="right")
    # Right truncation keeps the article's start and learns nothing; prompt truncation learns every summary token.
    right_labels = load_split(right_out, "train", "labels")[0]
    assert np.all(right_labels == IGNORE_INDEX)
    # The same rows with room for everything: the learned tokens each example should keep.
    whole_out, _ = run_tokenize(tmp_path, {"tokenize": {**raw["tokenize"], "block_size": 1024}}, {"train": rows, "validation": rows[:2]},
                                name="whole")
    learned = lambda pairs: [[i for i, label in zip(*pair) if label != IGNORE_INDEX] for pair in pairs]  # noqa: E731
    whole = examples_of(*load_split(whole_out, "train", "input_ids", "labels", "offsets"))
    cut = examples_of(ids, labels, offsets)
    assert all(len(example_ids) == 48 for example_ids, _ in cut)
    assert learned(cut) == learned(whole) and all(len(tokens) >= 5 for tokens in learned(whole))
    assert all(c[0][:10] == w[0][:10] for c, w in zip(cut, whole))  # the article's start survives


def test_prompt_truncation_is_for_causal_lms_with_masked_prompts():
    with pytest.raises(ConfigError, match="task is 'classification'"):
        build_config(None, ["task=classification", "tokenize.truncation=prompt"])
    with pytest.raises(ConfigError, match="needs tokenize.mask_prompt true"):
        build_config(None, ["tokenize.truncation=prompt", "tokenize.mask_prompt=false"])


def test_a_soft_prompt_on_packed_blocks_is_warned_about_before_training(tmp_path):
    """Prompt tuning puts its virtual tokens in front of each row the model sees: with concat or
    bins packing that is a block of several examples, not each example. Said once, before any
    stage runs; `packing: none` (one example per row) is quiet."""
    from pipeline import stages
    from pipeline.config import build_config

    said: list[str] = []
    for packing in ("concat", "bins", "none"):
        cfg = build_config({"train": {"method": "prompt_tuning"}, "tokenize": {"packing": packing}}, [])
        stages.preflight(cfg, {"train": "0" * 64}, str(tmp_path), log=said.append)
    placement = [line for line in said if "is placed once" in line]
    assert len(placement) == 2
    assert all(line.startswith("warning: train.method prompt_tuning with tokenize.packing ") for line in placement)
    assert all("set tokenize.packing=none" in line for line in placement)
    assert build_config({"train": {"method": "lora"}}, []).disappointing_settings() == []
