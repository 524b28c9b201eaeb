"""Ragged token arrays and the three ways tokenize lays examples out for training.

An example set is `Ragged(ids, labels, offsets)`: every example's tokens concatenated (int32) and
`offsets` (int64, examples + 1) where example i is `ids[offsets[i]:offsets[i + 1]]`. Everything
here is vectorised numpy except first-fit-decreasing, which is sequential by nature and runs on
a max-tree so each placement costs O(log bins).

    packed = pack_bins(truncate(examples, 2048, "right").kept, 2048, pad_id)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = -100
"""The label torch's cross-entropy skips."""


@dataclass(frozen=True)
class Ragged:
    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @staticmethod
    def empty() -> "Ragged":
        return Ragged(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def positions_within(lengths: np.ndarray) -> np.ndarray:
    """For each token of a ragged array, its index inside its example: 0, 1, .., 0, 1, ..."""
    total = int(lengths.sum())
    starts = offsets_of(lengths)[:-1]
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def interleave(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Join k ragged arrays example by example: example i = part0[i] + part1[i] + ... .

    parts: (flat values, lengths) with the same number of examples each. Returns (flat values,
    offsets of the joined examples, index of the part each token came from (int8)).
    """
    lengths = np.stack([n for _, n in parts])  # [k, examples]
    joined = offsets_of(lengths.sum(axis=0))
    total = int(joined[-1])
    values = np.empty(total, dtype=np.result_type(*(v for v, _ in parts)))
    source = np.empty(total, dtype=np.int8)
    before = np.zeros(lengths.shape[1], np.int64)  # tokens of earlier parts in each example
    for k, (flat, n) in enumerate(parts):
        # Destination = example start + earlier parts + index within this part.
        dest = np.repeat(joined[:-1] + before, n) + positions_within(n)
        values[dest] = flat
        source[dest] = k
        before += n
    return values, joined, source


def concatenate(pieces: list[Ragged]) -> Ragged:
    if not pieces:
        return Ragged.empty()
    lengths = np.concatenate([p.lengths for p in pieces])
    return Ragged(
        np.concatenate([p.ids for p in pieces]),
        np.concatenate([p.labels for p in pieces]),
        offsets_of(lengths),
    )


# ---------------------------------------------------------------- truncation


class Truncated(NamedTuple):
    kept: Ragged
    truncated: int
    """Examples shortened to max_length."""
    dropped: int
    """Examples removed (`drop` mode)."""


def select(examples: Ragged, keep: np.ndarray) -> Ragged:
    """The examples where `keep` (bool, one per example) is true, in order."""
    lengths = examples.lengths
    keep_token = np.repeat(keep, lengths)
    return Ragged(examples.ids[keep_token], examples.labels[keep_token], offsets_of(lengths[keep]))


def truncate(examples: Ragged, max_length: int, mode: str) -> Truncated:
    """Shorten examples longer than max_length: keep the first tokens (`right`), the last
    tokens (`left`), cut the middle of the prompt and never the learned part (`prompt`), or drop
    the example (`drop`)."""
    lengths = examples.lengths
    too_long = lengths > max_length
    count = int(too_long.sum())
    if count == 0:
        return Truncated(examples, 0, 0)
    if mode == "drop":
        return Truncated(select(examples, ~too_long), 0, count)
    pos = positions_within(lengths)
    if mode == "prompt":
        return _cut_prompts(examples, max_length, too_long, pos)
    if mode == "right":
        keep_token = pos < max_length
    elif mode == "left":
        keep_token = pos >= np.repeat(lengths - max_length, lengths)
    else:
        raise ValueError(f"unknown truncation mode {mode!r}")
    kept = Ragged(examples.ids[keep_token], examples.labels[keep_token], offsets_of(np.minimum(lengths, max_length)))
    return Truncated(kept, count, 0)


def _cut_prompts(examples: Ragged, max_length: int, too_long: np.ndarray, pos: np.ndarray) -> Truncated:
    """`prompt` truncation, for a long article and its summary: an example's prompt is its tokens
    before the first learned label. A too-long example keeps its whole learned part and fills the
    room left with its prompt's first three quarters and last quarter (the instruction before the
    article, the answer marker after it), cutting the middle; one whose learned part alone does
    not fit is dropped. The learned part is never cut: a summary cut short teaches stopping early."""
    prompt = prompt_lengths(examples, pos)
    room = max_length - (examples.lengths - prompt)  # what is left for the prompt
    fits = ~too_long | (room >= 1)
    dropped = int((~fits).sum())
    if dropped:
        examples, too_long, prompt, room = select(examples, fits), too_long[fits], prompt[fits], room[fits]
        pos = positions_within(examples.lengths)
    lengths = examples.lengths
    tail = np.where(too_long, room // 4, 0)
    head = np.where(too_long, room - tail, prompt)
    p, h, t = (np.repeat(a, lengths) for a in (prompt, head, tail))
    keep_token = (pos < h) | ((pos >= p - t) & (pos < p)) | (pos >= p)
    kept = Ragged(examples.ids[keep_token], examples.labels[keep_token], offsets_of(np.where(too_long, max_length, lengths)))
    return Truncated(kept, int(too_long.sum()), dropped)


def prompt_lengths(examples: Ragged, pos: np.ndarray) -> np.ndarray:
    """Each example's tokens before its first learned label (all of them when none is learned)."""
    lengths = examples.lengths
    if not len(lengths):
        return np.zeros(0, np.int64)
    learned = examples.labels != IGNORE_INDEX
    first = np.where(learned, pos, np.repeat(lengths, lengths))
    return np.minimum.reduceat(first, examples.offsets[:-1])


# ---------------------------------------------------------------- packing


def pack_concat(examples: Ragged, block_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Join all examples in order and cut the stream into [rows, block_size]; only the last row
    pads, and its padding carries no loss. Nothing is truncated; examples may span rows."""
    total = len(examples.ids)
    rows = -(-total // block_size)
    padding = rows * block_size - total
    ids = np.concatenate([examples.ids, np.full(padding, pad_id, np.int32)])
    labels = np.concatenate([examples.labels, np.full(padding, IGNORE_INDEX, np.int32)])
    return ids.reshape(rows, block_size), labels.reshape(rows, block_size)


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Place items into bins of `capacity`, longest first, each into the leftmost bin it fits.

    Returns (bin of each item, start of each item inside its bin, number of bins). Ties in length
    keep the input order (stable sort) and "leftmost" is unique, so the result is deterministic.

    The bins' remaining capacities sit in the leaves of a max-tree (a segment tree whose nodes hold
    the max of their children): the leftmost bin with room >= L is found by walking down from the
    root, always left when the left subtree has room. Placement and update are O(log bins), so
    100k items take well under a second of Python, where a scan over open bins is O(items x bins).
    """
    n = len(lengths)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    if int(lengths.max()) > capacity:
        raise ValueError(f"an item of length {int(lengths.max())} does not fit a bin of {capacity}")
    # First fit leaves at most one bin at most half full, so it never needs more than this.
    bound = min(n, 2 * -(-int(lengths.sum()) // capacity) + 1)
    size = 1 << max(0, (bound - 1).bit_length())
    tree = [capacity] * (2 * size)  # a Python list: scalar indexing is several times faster than numpy's
    order = np.argsort(-lengths, kind="stable")
    bin_of = np.empty(n, np.int64)
    start_of = np.empty(n, np.int64)
    used = 0
    for item, length in zip(order.tolist(), lengths[order].tolist()):
        node = 1
        while node < size:
            node <<= 1
            if tree[node] < length:
                node += 1
        b = node - size
        start_of[item] = capacity - tree[node]
        bin_of[item] = b
        used = max(used, b + 1)
        tree[node] -= length
        node >>= 1
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break  # ancestors hold the same max as before: nothing above changes
            tree[node] = best
            node >>= 1
    return bin_of, start_of, used


def pack_bins(examples: Ragged, block_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place whole examples (each <= block_size; truncate first) into rows of block_size by
    first-fit-decreasing. Returns input_ids, labels and position_ids, all int32 [rows, block_size];
    position ids restart at 0 with each example; padding has id pad_id, label -100, position 0."""
    lengths = examples.lengths
    bin_of, start_of, rows = first_fit_decreasing(lengths, block_size)
    ids = np.full((rows, block_size), pad_id, np.int32)
    labels = np.full((rows, block_size), IGNORE_INDEX, np.int32)
    positions = np.zeros((rows, block_size), np.int32)
    within = positions_within(lengths)
    dest = np.repeat(bin_of * block_size + start_of, lengths) + within
    ids.reshape(-1)[dest] = examples.ids
    labels.reshape(-1)[dest] = examples.labels
    positions.reshape(-1)[dest] = within
    return ids, labels, positions


def split_stats(examples: int, tokens: int, label_tokens: int, rows: int, slots: int, truncated=0, dropped=0, basis="rows x block_size") -> dict:
    """A split's tokenize statistics for meta.json (the same keys for every layout)."""
    return {
        "examples": examples,
        "tokens": tokens,
        "label_tokens": label_tokens,
        "rows": rows,
        "truncated": truncated,
        "dropped": dropped,
        # Real tokens over the slots the trainer feeds: rows x block_size for packed blocks.
        # Unpacked examples are padded per batch, which is unknowable here, so they are measured
        # against padding every example to block_size (`padding="max_length"`).
        "slots": slots,
        "utilisation": round(tokens / slots, 4) if slots else 0.0,
        "utilisation_basis": basis,
    }
