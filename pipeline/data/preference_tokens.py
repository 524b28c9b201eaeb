"""Preference pairs as tokens: the tokenize stage's layout for task `preference` (DPO).

Per split, the `none` layout of 2 x pairs sequences, chosen and rejected alternating (pair i is
rows 2i and 2i + 1), read by data/loader.py's `PreferencePairs`:

    input_ids.npy, labels.npy   flat int32; labels -100 on the prompt: a DPO log-probability is the answer's
    offsets.npy                 int64 [2 x pairs + 1]

Truncation keeps pairs whole: a pair one of whose sequences would lose its answer (all of it, or
with `prompt` any of it, or with `drop` any token) is dropped as a pair, so every pair left
compares two answers to one prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.config import TokenizeConfig
from pipeline.data.packing import (
    IGNORE_INDEX, Ragged, concatenate, interleave, offsets_of, positions_within, prompt_lengths, select, split_stats, truncate,
)
from pipeline.data.text_tokenizer import chat_examples, encode_flat

ANSWERS = ("chosen", "rejected")
"""Preprocess's answer columns, in sequence order: pair i is sequences 2i (chosen) and 2i + 1."""


def _alternate(chosen: Ragged, rejected: Ragged) -> Ragged:
    """chosen[0], rejected[0], chosen[1], ...: pair i is sequences 2i and 2i + 1."""
    ids, _, _ = interleave([(chosen.ids, chosen.lengths), (rejected.ids, rejected.lengths)])
    labels, _, _ = interleave([(chosen.labels, chosen.lengths), (rejected.labels, rejected.lengths)])
    return Ragged(ids, labels, offsets_of(np.stack([chosen.lengths, rejected.lengths], axis=1).ravel()))


def text_pairs(rows: dict[str, list[str]], encoder, eos_id: int) -> Ragged:
    """prompt + answer + eos, for both answers; the prompt unlabelled."""
    prompt = encode_flat(encoder, rows["prompt"])
    ends = (np.full(len(rows["prompt"]), eos_id, np.int32), np.ones(len(rows["prompt"]), np.int64))
    sequences = []
    for answer in ANSWERS:
        ids, offsets, part = interleave([prompt, encode_flat(encoder, rows[answer]), ends])
        sequences.append(Ragged(ids, np.where(part == 0, IGNORE_INDEX, ids).astype(np.int32), offsets))
    return _alternate(*sequences)


def chat_pairs(rows: dict[str, list[str]], tokenizer, encoder, first_row: int) -> Ragged:
    """The prompt's messages plus each answer, rendered by the chat template; only the final
    assistant turn (content and end marker) labelled, not earlier assistant turns of the prompt."""
    prompts = [json.loads(m) for m in rows["messages"]]
    sequences = []
    for answer in ANSWERS:
        conversations = [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, rows[answer])]
        ids, labels, lengths = chat_examples(tokenizer, encoder, conversations, True, first_row)
        sequences.append(Ragged(ids, _last_labelled_run(labels, offsets_of(lengths)), offsets_of(lengths)))
    return _alternate(*sequences)


def _last_labelled_run(labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    out = np.full_like(labels, IGNORE_INDEX)
    for start, end in zip(offsets[:-1], offsets[1:]):
        learned = np.flatnonzero(labels[start:end] != IGNORE_INDEX)
        if len(learned):
            gaps = np.flatnonzero(np.diff(learned) > 1)
            first = learned[gaps[-1] + 1] if len(gaps) else learned[0]
            out[start + first : end] = labels[start + first : end]
    return out


def columns(chat: bool) -> list[str]:
    """The preprocess output's columns the pairs are made of."""
    return ["messages" if chat else "prompt", *ANSWERS]


def tokenize_pairs(batches: Iterable[tuple[int, list[list]]], tokenizer, encoder, chat: bool) -> Ragged:
    """batches: (first row, values of `columns(chat)`) as tokenize.iter_columns reads them."""
    pieces = []
    for first, values in batches:
        rows = dict(zip(columns(chat), values))
        pieces.append(chat_pairs(rows, tokenizer, encoder, first) if chat else text_pairs(rows, encoder, tokenizer.eos_token_id))
    return concatenate(pieces)


def write_pairs(folder: Path, sequences: Ragged, cfg: TokenizeConfig) -> dict:
    """Fit the pairs into block_size (keeping them whole) and write the `none` layout."""
    pairs = len(sequences) // 2
    lengths = sequences.lengths.reshape(pairs, 2)
    # An answer runs from its first labelled token to the sequence's end, as packing._cut_prompts reads it.
    answers = (sequences.lengths - prompt_lengths(sequences, positions_within(sequences.lengths))).reshape(pairs, 2)
    too_long = (lengths > cfg.block_size).any(axis=1)
    # A pair is dropped whole where its truncation would leave a sequence without its whole answer
    # (`prompt`: an answer longer than the block) or without any of it (`right`: a prompt that
    # fills the block), or with `drop` wherever it does not fit. `left` keeps every answer's end.
    if cfg.truncation == "drop":
        lost = too_long
    elif cfg.truncation == "prompt":
        # packing._cut_prompts keeps at least one prompt token: an answer of block_size tokens
        # in a sequence that does not fit is dropped there too.
        lost = ((answers >= cfg.block_size) & (lengths > cfg.block_size)).any(axis=1)
    elif cfg.truncation == "right":
        lost = (lengths - answers >= cfg.block_size).any(axis=1)
    else:
        lost = np.zeros(pairs, bool)
    kept = select(sequences, np.repeat(~lost, 2))
    cut = truncate(kept, cfg.block_size, "right" if cfg.truncation == "drop" else cfg.truncation)
    assert cut.dropped == 0, "pairs whose answer cannot fit were removed above"
    np.save(folder / "input_ids.npy", cut.kept.ids)
    np.save(folder / "labels.npy", cut.kept.labels)
    np.save(folder / "offsets.npy", cut.kept.offsets)
    n = len(cut.kept) // 2
    return split_stats(n, len(cut.kept.ids), int(np.count_nonzero(cut.kept.labels != IGNORE_INDEX)), n, 2 * n * cfg.block_size,
                       int(too_long[~lost].sum()), int(lost.sum()), "pairs x 2 x block_size")
