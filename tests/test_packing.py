"""Packing (ragged arrays, truncation, concat, first-fit-decreasing bins) and the loaders that read each layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import train_losses, trainer_args

from pipeline.train import recipe
from pipeline.data.loader import BinnedBlocks, ClassifiedTexts, Examples, PackedBlocks, SourceTargetPairs, held_out_batches, open_split, sample_ids
from pipeline.data.packing import (
    IGNORE_INDEX,
    Ragged,
    first_fit_decreasing,
    interleave,
    offsets_of,
    pack_bins,
    pack_concat,
    truncate,
)


def ragged(*examples: list[int], labels: list[list[int]] | None = None) -> Ragged:
    ids = np.array([t for e in examples for t in e], np.int32)
    lab = np.array([t for e in labels for t in e], np.int32) if labels else ids.copy()
    return Ragged(ids, lab, offsets_of(np.array([len(e) for e in examples])))


def as_lists(r: Ragged) -> list[list[int]]:
    return [r.ids[a:b].tolist() for a, b in zip(r.offsets[:-1], r.offsets[1:])]


def test_interleave_joins_parts_example_by_example():
    prompts = (np.array([1, 2, 3], np.int32), np.array([2, 0, 1]))
    responses = (np.array([10, 11, 12, 13], np.int32), np.array([1, 2, 1]))
    eos = (np.array([9, 9, 9], np.int32), np.ones(3, np.int64))
    values, offsets, part = interleave([prompts, responses, eos])
    assert values.tolist() == [1, 2, 10, 9, 11, 12, 9, 3, 13, 9]
    assert offsets.tolist() == [0, 4, 7, 10]
    assert part.tolist() == [0, 0, 1, 2, 1, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "mode, kept, truncated, dropped",
    [
        ("right", [[1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13]], 1, 0),
        ("left", [[1, 2, 3], [6, 7, 8, 9], [10, 11, 12, 13]], 1, 0),
        ("drop", [[1, 2, 3], [10, 11, 12, 13]], 0, 1),
    ],
)
def test_truncation_modes(mode, kept, truncated, dropped):
    examples = ragged([1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11, 12, 13], labels=[[-100, 2, 3], [-100, -100, 6, 7, 8, 9], [10, 11, 12, 13]])
    cut = truncate(examples, 4, mode)
    assert as_lists(cut.kept) == kept
    assert (cut.truncated, cut.dropped) == (truncated, dropped)
    # Labels travel with their tokens.
    expected_labels = {"right": [-100, -100, 6, 7], "left": [6, 7, 8, 9]}.get(mode)
    if expected_labels:
        assert cut.kept.labels[3:7].tolist() == expected_labels


def test_concat_cuts_the_stream_and_pads_only_the_last_block():
    ids, labels = pack_concat(ragged([1, 2, 3], [4, 5], [6, 7, 8, 9, 10]), 4, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert labels.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, IGNORE_INDEX, IGNORE_INDEX]]
    assert ids.dtype == labels.dtype == np.int32


def test_first_fit_decreasing_on_a_known_case():
    # Longest first (ties in input order): 7 -> bin 0; 5 -> bin 1; 4 -> bin 1; 4 -> bin 2;
    # 3 -> bin 0 (fills it); 2 -> bin 2; 1 -> bin 1 (fills it).
    bin_of, start_of, bins = first_fit_decreasing(np.array([5, 3, 7, 2, 4, 4, 1]), 10)
    assert bins == 3
    assert bin_of.tolist() == [1, 0, 0, 2, 1, 2, 1]
    assert start_of.tolist() == [0, 7, 0, 4, 5, 0, 9]


def naive_ffd(lengths: np.ndarray, capacity: int):
    room, bin_of, start_of = [], [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # sorted() is stable
        b = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if b is None:
            room.append(capacity)
            b = len(room) - 1
        bin_of[i], start_of[i] = b, capacity - room[b]
        room[b] -= lengths[i]
    return bin_of, start_of, len(room)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_fit_decreasing_matches_the_textbook_algorithm(seed):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(3, 1, 600).astype(np.int64) + 1, 64)
    bin_of, start_of, bins = first_fit_decreasing(lengths, 64)
    ref_bin, ref_start, ref_bins = naive_ffd(lengths.tolist(), 64)
    assert (bin_of.tolist(), start_of.tolist(), bins) == (ref_bin, ref_start, ref_bins)


def test_pack_bins_places_whole_examples_with_restarting_positions():
    examples = ragged([1, 2, 3], [4, 5, 6, 7, 8], [9, 10], labels=[[-100, 2, 3], [-100, -100, 6, 7, 8], [9, 10]])
    ids, labels, positions = pack_bins(examples, 6, pad_id=0)
    # FFD: 5 tokens -> row 0; 3 -> row 1; 2 -> row 1 after it.
    assert ids.tolist() == [[4, 5, 6, 7, 8, 0], [1, 2, 3, 9, 10, 0]]
    assert labels.tolist() == [[-100, -100, 6, 7, 8, -100], [-100, 2, 3, 9, 10, -100]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 0]]


# ---------------------------------------------------------------- loaders


def write_split(root: Path, meta: dict, split: str = "train", **arrays) -> Path:
    (root / split).mkdir(parents=True)
    for name, value in arrays.items():
        np.save(root / split / f"{name}.npy", value)
    (root / "meta.json").write_text(json.dumps(meta))
    return root / split


def test_concat_loader(tmp_path):
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    folder = write_split(tmp_path, {"packing": "concat", "block_size": 4, "pad_id": 0, "splits": {"train": {"tokens": 10}}},
                         input_ids=ids, labels=ids)
    loader = open_split(folder)
    assert type(loader) is PackedBlocks and len(loader) == 3 and loader.block_size == 4
    batch = loader.batch([2, 0])
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].dtype == torch.int64
    assert batch["input_ids"].tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]
    assert loader.real_tokens([2, 0]) == 2 + 4  # the last block holds 10 - 8 real tokens


def test_bins_loader(tmp_path):
    ids, labels, positions = pack_bins(ragged([1, 2, 3], [4, 5, 6, 7, 8], [9, 10]), 6, pad_id=0)
    folder = write_split(tmp_path, {"packing": "bins", "block_size": 6, "pad_id": 0},
                         input_ids=ids, labels=labels, position_ids=positions)
    loader = open_split(folder)
    assert type(loader) is BinnedBlocks
    batch = loader.batch([1])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert loader.real_tokens([0, 1]) == 10


def test_unpacked_loader_pads_each_batch_to_its_longest(tmp_path):
    examples = ragged([1, 2, 3], [4, 5, 6, 7, 8], [9, 10], labels=[[-100, 2, 3], [-100, -100, 6, 7, 8], [9, 10]])
    folder = write_split(tmp_path, {"packing": "none", "block_size": 8, "pad_id": 99},
                         input_ids=examples.ids, labels=examples.labels, offsets=examples.offsets)
    loader = open_split(folder)
    assert type(loader) is Examples and len(loader) == 3 and loader.block_size == 8
    batch = loader.batch([2, 0])
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].tolist() == [[9, 10, 99], [1, 2, 3]]
    assert batch["labels"].tolist() == [[9, 10, -100], [-100, 2, 3]]
    assert loader.batch([1])["input_ids"].shape == (1, 5)
    assert loader.real_tokens([2, 0]) == 5


def test_classification_and_seq2seq_loaders(tmp_path):
    texts = ragged([5, 6, 7], [8])
    folder = write_split(tmp_path / "cls", {"task": "classification", "packing": "none", "block_size": 8, "pad_id": 0, "label_names": ["a", "b"]},
                         input_ids=texts.ids, offsets=texts.offsets, class_ids=np.array([1, 0]))
    loader = open_split(folder)
    assert type(loader) is ClassifiedTexts and len(loader) == 2
    batch = loader.batch([1, 0])
    assert batch["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [0, 1]

    target = ragged([20, 21, 2], [22, 2])
    folder = write_split(tmp_path / "s2s", {"task": "seq2seq", "packing": "none", "block_size": 8, "pad_id": 0},
                         input_ids=texts.ids, offsets=texts.offsets, target_ids=target.ids, target_offsets=target.offsets)
    loader = open_split(folder)
    assert type(loader) is SourceTargetPairs
    batch = loader.batch([1, 0])
    assert batch["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]
    assert batch["labels"].tolist() == [[22, 2, -100], [20, 21, 2]]
    assert loader.real_tokens([0, 1]) == 4 + 5


def test_folder_without_packing_in_meta_reads_as_concat(tmp_path):
    ids = np.ones((2, 4), np.int32)
    folder = write_split(tmp_path, {"block_size": 4, "vocab_size": 9, "pad_id": 0, "eos_id": 0}, input_ids=ids, labels=ids)
    loader = open_split(folder)
    assert type(loader) is PackedBlocks and loader.real_tokens([0, 1]) == 8


@pytest.mark.parametrize("packing", ["bins", "none"])
def test_trainer_runs_on_each_causal_layout(tmp_path, packing):
    """train.py feeds the dict batches to the model (position_ids for bins, per-batch padding for none)."""
    examples = ragged(*[[1 + (i + j) % 40 for j in range(3 + i % 9)] for i in range(24)])
    root = tmp_path / "tok"
    if packing == "bins":
        ids, labels, positions = pack_bins(examples, 16, pad_id=0)
        write_split(root, {"packing": "bins", "block_size": 16, "vocab_size": 48, "pad_id": 0, "eos_id": 0},
                    input_ids=ids, labels=labels, position_ids=positions)
    else:
        write_split(root, {"packing": "none", "block_size": 16, "vocab_size": 48, "pad_id": 0, "eos_id": 0},
                    input_ids=examples.ids, labels=examples.labels, offsets=examples.offsets)
    (root / "tokenizer").mkdir()
    assert recipe.main(trainer_args(root, tmp_path, "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "train.max_steps=3",
                                    "train.warmup_steps=1", "train.micro_batch_size=24", "train.save_every_steps=100")) == 0
    stats = json.loads((tmp_path / "out" / "train_stats.json").read_text())
    losses = train_losses(tmp_path / "out")
    assert len(losses) == 3 and all(np.isfinite(losses))
    # Each step reads 24 rows of the epoch-shuffled stream (bins has fewer rows, so a step wraps
    # into the next epoch): the throughput count is the real tokens of exactly those rows.
    loader = open_split(root / "train")
    expected = sum(loader.real_tokens(sample_ids(24 * s, 24, len(loader), 0)) for s in range(3))
    assert stats["tokens_this_run"] == expected
    if packing == "none":
        assert expected == 3 * len(examples.ids)  # one epoch per step: every real token, no padding


def test_bins_examples_do_not_attend_to_each_other_in_the_trainers_forward():
    """Position ids restarting inside a block isolate examples (transformers 5 builds a
    block-diagonal causal mask from them) when called as the trainer calls: no attention mask, no
    cache. The second example's logits must equal those of the example run alone."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, eos_token_id=0, bos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    first, second = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 7))
    packed = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        alone = model(input_ids=second, use_cache=False).logits
        isolated = model(input_ids=packed, position_ids=positions, use_cache=False).logits[:, 5:]
    torch.testing.assert_close(isolated, alone, atol=1e-5, rtol=1e-5)


def test_length_grouped_order_is_the_same_rows_sorted_within_groups():
    from pipeline.data.loader import LENGTH_GROUP

    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 200, size=300)
    plain = sample_ids(0, 600, 300, seed=3)
    grouped = sample_ids(0, 600, 300, seed=3, lengths=lengths)
    for epoch in (0, 1):  # each epoch: the same rows, once each
        assert sorted(grouped[epoch * 300:(epoch + 1) * 300]) == list(range(300))
    for start in range(0, 300, LENGTH_GROUP):  # each group: the plain order's rows, sorted by length
        group = slice(start, min(start + LENGTH_GROUP, 300))
        assert sorted(grouped[group]) == sorted(plain[group])
        assert list(lengths[grouped[group]]) == sorted(lengths[grouped[group]])
    # A pure function of the position: any window of the stream reads the same rows.
    assert list(sample_ids(37, 100, 300, seed=3, lengths=lengths)) == list(grouped[37:137])


def test_held_out_batches_score_every_row_when_they_fit():
    assert held_out_batches(19, 8, 3) == [list(range(0, 8)), list(range(8, 16)), [16, 17, 18]]
    assert held_out_batches(0, 8, 3) == []


def test_held_out_batches_over_the_limit_spread_over_the_whole_split():
    # A split sorted by label (600 rows of 6 classes): scoring its head would see one class only.
    label_of = np.repeat(np.arange(6), 100)
    batches = held_out_batches(600, 8, 10)
    ids = [i for batch in batches for i in batch]
    assert [len(b) for b in batches] == [8] * 10
    assert ids == sorted(set(ids)) and 0 <= ids[0] and ids[-1] < 600
    assert set(label_of[ids]) == set(range(6))
    assert held_out_batches(600, 8, 10) == batches  # the same subset on every run and rank
