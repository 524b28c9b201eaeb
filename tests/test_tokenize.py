"""The tokenize stage for causal LM rows, on preprocess-like parquet files written here (not by
preprocess): a deterministic scratch tokenizer, the prompt mask, and the concat, bins and none layouts.

Chat, classification and seq2seq rows: test_tokenize_tasks.py; pretrained tokenizers: test_tokenize_pretrained.py.
"""

from pathlib import Path

import numpy as np
import pytest
from tiny import SMALL, TRAIN, VALIDATION, examples_of, load_split, meta_of, run_tokenize
from transformers import AutoTokenizer

from pipeline.config import build_config
from pipeline.data.text_tokenizer import EOS, build_tokenizer

# Lengths from a few tokens to well over a block of 24, for bins and truncation.
VARIED = [(f"Q{i}: ", "ok " * (i % 9) + "done.") for i in range(24)] + [("Long: ", "many words here " * 12)]


def test_scratch_tokenizer_is_deterministic(tmp_path):
    cfg = build_config(SMALL)
    texts = [p + r for p, r in TRAIN]
    for name, corpus in [("a", texts), ("b", list(texts)), ("other", texts[:5])]:
        build_tokenizer(cfg.model, cfg.tokenize, iter(corpus)).save_pretrained(tmp_path / name)
    a, b, other = ((tmp_path / n / "tokenizer.json").read_bytes() for n in ("a", "b", "other"))
    assert a == b
    assert a != other  # the comparison can fail: the vocabulary depends on the texts


# ---------------------------------------------------------------- causal LM, concat


def test_concat_labels_mask_exactly_the_prompt(tmp_path):
    out, _ = run_tokenize(tmp_path)
    meta = meta_of(out)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    eos = meta["eos_id"]
    assert eos == meta["pad_id"] == tokenizer.convert_tokens_to_ids(EOS)
    assert (meta["task"], meta["packing"]) == ("causal_lm", "concat")

    for split, rows in [("train", TRAIN), ("validation", VALIDATION)]:
        ids, labels = (a.reshape(-1) for a in load_split(out, split))
        tokens = meta["splits"][split]["tokens"]
        assert (ids[tokens:] == meta["pad_id"]).all() and (labels[tokens:] == -100).all()
        ends = np.flatnonzero(ids[:tokens] == eos)
        assert len(ends) == len(rows) == meta["splits"][split]["examples"]
        assert ends[-1] == tokens - 1
        starts = np.concatenate([[0], ends[:-1] + 1])
        for (prompt, response), start, end in zip(rows, starts, ends):
            seq_ids, seq_labels = ids[start : end + 1], labels[start : end + 1]
            masked = seq_labels == -100
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            assert masked.tolist() == [True] * n_prompt + [False] * (len(seq_ids) - n_prompt)
            assert tokenizer.decode(seq_ids[masked]) == prompt
            assert tokenizer.decode(seq_labels[~masked][:-1]) == response
            assert seq_labels[-1] == eos
        assert meta["splits"][split]["label_tokens"] == int((labels != -100).sum())


def test_unmasked_labels_equal_inputs(tmp_path):
    out, _ = run_tokenize(tmp_path, {"tokenize": {**SMALL["tokenize"], "mask_prompt": False}})
    meta = meta_of(out)
    ids, labels = (a.reshape(-1) for a in load_split(out, "train"))
    tokens = meta["splits"]["train"]["tokens"]
    assert (labels[:tokens] == ids[:tokens]).all()
    assert meta["splits"]["train"]["label_tokens"] == tokens


def test_concat_shapes_meta_and_stats(tmp_path):
    out, stats = run_tokenize(tmp_path)
    meta = meta_of(out)
    assert meta["block_size"] == 16 and meta["vocab_size"] == 300
    for split in ("train", "validation", "test"):
        ids, labels = load_split(out, split)
        info = meta["splits"][split]
        assert ids.dtype == labels.dtype == np.int32
        assert ids.shape == labels.shape == (info["rows"], 16)
        assert info["rows"] == -(-info["tokens"] // 16)
        assert (info["truncated"], info["dropped"]) == (0, 0)
    train, validation = meta["splits"]["train"], meta["splits"]["validation"]
    tokens = train["tokens"] + validation["tokens"]
    assert meta["splits"]["test"]["rows"] == 0  # no test.parquet: an empty split
    assert stats["tokens"] == tokens and stats["examples"] == len(TRAIN) + 1
    assert (stats["train_rows"], stats["validation_rows"], stats["test_rows"]) == (train["rows"], validation["rows"], 0)
    assert stats["utilisation"] == round(tokens / ((train["rows"] + validation["rows"]) * 16), 4)
    assert stats["splits"] == meta["splits"]


def test_short_validation_split_gets_one_padded_block(tmp_path):
    out, stats = run_tokenize(tmp_path, splits={"train": TRAIN, "validation": [("Q?", "A.")]})
    meta = meta_of(out)
    ids, labels = load_split(out, "validation")
    tokens = meta["splits"]["validation"]["tokens"]
    assert stats["validation_rows"] == 1 and ids.shape == (1, 16) and 0 < tokens < 16
    assert (ids[0, tokens:] == meta["pad_id"]).all() and (labels[0, tokens:] == -100).all()
    assert labels[0, tokens - 1] == meta["eos_id"]


def test_empty_splits(tmp_path):
    out, stats = run_tokenize(tmp_path, splits={"train": TRAIN, "validation": []})
    assert stats["validation_rows"] == 0
    assert np.load(out / "validation" / "input_ids.npy").shape == (0, 16)
    with pytest.raises(ValueError, match="train split has no tokens"):
        run_tokenize(tmp_path / "again", splits={"train": [], "validation": VALIDATION})


# ---------------------------------------------------------------- causal LM, bins and none


def varied(tmp_path: Path, packing: str, truncation: str = "right", name: str = "out") -> tuple[Path, dict]:
    raw = {"tokenize": {"vocab_size": 300, "block_size": 24, "packing": packing, "truncation": truncation}}
    return run_tokenize(tmp_path, raw, splits={"train": VARIED}, name=name)


def concat_examples(out: Path) -> list[tuple[list[int], list[int]]]:
    """The examples of a concat output, cut at each eos (every example ends with exactly one)."""
    meta = meta_of(out)
    ids, labels = (a.reshape(-1)[: meta["splits"]["train"]["tokens"]] for a in load_split(out, "train"))
    ends = np.flatnonzero(ids == meta["eos_id"]) + 1
    return examples_of(ids, labels, np.concatenate([[0], ends]))


def test_none_layout_holds_each_example_whole_up_to_block_size(tmp_path):
    reference = concat_examples(varied(tmp_path, "concat", name="concat")[0])
    out, stats = varied(tmp_path, "none")
    ids, labels, offsets = load_split(out, "train", "input_ids", "labels", "offsets")
    assert ids.dtype == labels.dtype == np.int32 and offsets.dtype == np.int64
    assert examples_of(ids, labels, offsets) == [(i[:24], l[:24]) for i, l in reference]
    info = meta_of(out)["splits"]["train"]
    long_ones = sum(len(i) > 24 for i, _ in reference)
    assert long_ones == 1 and (info["truncated"], info["dropped"]) == (1, 0)
    assert info["examples"] == info["rows"] == len(VARIED)
    assert info["utilisation"] == round(len(ids) / (len(VARIED) * 24), 4)
    assert info["utilisation_basis"] == "examples x block_size"
    assert meta_of(out)["packing"] == "none"


@pytest.mark.parametrize("truncation", ["left", "drop"])
def test_none_layout_truncation_modes(tmp_path, truncation):
    reference = concat_examples(varied(tmp_path, "concat", name="concat")[0])
    out, _ = varied(tmp_path, "none", truncation)
    found = examples_of(*load_split(out, "train", "input_ids", "labels", "offsets"))
    if truncation == "left":
        assert found == [(i[-24:], l[-24:]) for i, l in reference]
    else:
        assert found == [e for e in reference if len(e[0]) <= 24]
    info = meta_of(out)["splits"]["train"]
    assert (info["truncated"], info["dropped"]) == ((1, 0) if truncation == "left" else (0, 1))


def test_bins_hold_whole_examples_with_restarting_positions(tmp_path):
    reference = concat_examples(varied(tmp_path, "concat", name="concat")[0])
    out, stats = varied(tmp_path, "bins")
    ids, labels, positions = load_split(out, "train", "input_ids", "labels", "position_ids")
    meta = meta_of(out)
    assert ids.shape == labels.shape == positions.shape and ids.shape[1] == 24 and positions.dtype == np.int32
    found = []
    for row_ids, row_labels, row_pos in zip(ids, labels, positions):
        # Every example starts at position 0 and counts up; padding is a run of zeros at the end
        # (every example here is longer than one token, so a lone 0 is padding).
        bounds = np.append(np.flatnonzero(row_pos == 0), len(row_pos))
        pieces = examples_of(row_ids, row_labels, bounds)
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert row_pos[a:b].tolist() == list(range(b - a))
        real = [p for p in pieces if len(p[0]) > 1]
        padding = pieces[len(real):]
        assert all(len(p[0]) > 1 for p in pieces[: len(real)])  # padding only at the end
        assert all(p == ([meta["pad_id"]], [-100]) for p in padding)
        found += real
    truncated = [(i[:24], l[:24]) for i, l in reference]
    assert sorted(found) == sorted(truncated)
    info = meta["splits"]["train"]
    assert info["truncated"] == 1 and info["tokens"] == sum(len(i) for i, _ in truncated)
    assert info["utilisation"] == round(info["tokens"] / ids.size, 4) and info["utilisation"] > 0.9
    # First-fit-decreasing: the first row starts with the longest example.
    assert positions[0, 23] == 23


def test_bins_row_order_is_first_fit_decreasing(tmp_path):
    out, _ = varied(tmp_path, "bins", "drop")
    _, _, positions = load_split(out, "train", "input_ids", "labels", "position_ids")
    # Example lengths per row, in placement order: every row's examples are non-increasing.
    for row in positions:
        starts = np.flatnonzero(row == 0)
        lengths = np.diff(np.append(starts, len(row)))
        assert (np.diff(lengths[:-1]) <= 0).all()
    info = meta_of(out)["splits"]["train"]
    assert (info["truncated"], info["dropped"], info["examples"]) == (0, 1, len(VARIED) - 1)


def test_output_is_byte_identical_on_a_rerun(tmp_path):
    for packing in ("concat", "bins", "none"):
        first, _ = varied(tmp_path, packing, name=f"{packing}-1")
        second, _ = varied(tmp_path, packing, name=f"{packing}-2")
        files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        assert len([f for f in files if f.suffix == ".npy"]) >= 3 * 2
        for f in files:
            assert (first / f).read_bytes() == (second / f).read_bytes(), f
