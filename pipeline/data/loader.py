"""Tokenized splits read through memory maps, in an order that is a pure function.

The tokenize stage commits one folder per split (layouts in pipeline/data/tokenize.py). The trainer
never tokenizes: `open_split(folder)` picks the loader for the folder's layout from the parent's
meta.json, and every loader has the same interface:

    loader = open_split("runs/tokenize/<fp>/train")
    len(loader)            # rows: packed blocks, or examples when unpacked
    loader.block_size      # the longest row a batch can have
    loader.batch(ids)      # {"input_ids", "labels"(, "position_ids")} int64 tensors [len(ids), length]
    loader.real_tokens(ids)  # tokens in those rows that are not padding (for throughput)

Which row comes `i`-th in the stream depends only on (seed, epoch, i): epoch = i // rows, and each
epoch is a seeded permutation. So resuming is O(1) from a single integer, `samples_seen`, and a
resume at another world size continues at the same sample, with no duplicate and no gap.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

IGNORE_INDEX = -100


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.int64))


def _read_meta(folder: Path) -> dict:
    path = folder.parent / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


class PackedBlocks:
    """`concat` packing: [rows, block_size] blocks of the joined token stream."""

    def __init__(self, folder: str | Path, meta: dict | None = None):
        folder = Path(folder)
        self.meta = meta = _read_meta(folder) if meta is None else meta
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 2:
            raise ValueError(f"{folder}: input_ids {self.input_ids.shape} and labels {self.labels.shape} disagree")
        # Only the last block pads; without per-split counts (older outputs) count every slot.
        self.tokens = meta.get("splits", {}).get(folder.name, {}).get("tokens", self.input_ids.size)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, block_ids) -> dict[str, torch.Tensor]:
        # The given order is kept so logged sample ids stay exact.
        return {"input_ids": _tensor(self.input_ids[block_ids]), "labels": _tensor(self.labels[block_ids])}

    def real_tokens(self, block_ids) -> int:
        rows = np.asarray(block_ids, dtype=np.int64)
        return int(np.clip(self.tokens - rows * self.block_size, 0, self.block_size).sum())


class BinnedBlocks(PackedBlocks):
    """`bins` packing: whole examples per block, positions restarting at 0 for each example.

    transformers 5 reads restarting position_ids as example boundaries and masks attention
    between examples (block-diagonal causal mask on sdpa/eager, varlen on flash-attention), as
    long as no attention_mask and no KV cache are passed: the trainer calls with use_cache=False.
    Models that ignore position_ids this way still see earlier examples of their block.
    """

    def __init__(self, folder: str | Path, meta: dict | None = None):
        super().__init__(folder, meta)
        self.position_ids = np.load(Path(folder) / "position_ids.npy", mmap_mode="r")
        self.pad_id = self.meta["pad_id"]

    def batch(self, block_ids) -> dict[str, torch.Tensor]:
        return {**super().batch(block_ids), "position_ids": _tensor(self.position_ids[block_ids])}

    def real_tokens(self, block_ids) -> int:
        # Padding is the tail: id pad, label -100, position 0. A real token looks like that only
        # if an example starts with pad/eos unlabelled, which prompt + response + eos never does.
        ids, labels, pos = self.input_ids[block_ids], self.labels[block_ids], self.position_ids[block_ids]
        return int(np.count_nonzero((ids != self.pad_id) | (labels != IGNORE_INDEX) | (pos != 0)))


class Examples:
    """`none` packing: one example per row, flat ids/labels with offsets; padded per batch.

    A batch is right-padded to its longest example with pad_id (labels -100). No attention mask
    is needed: with right padding a causal model's real tokens come before every pad, so no real
    token attends to one, and pads carry no loss.
    """

    def __init__(self, folder: str | Path, meta: dict | None = None):
        folder = Path(folder)
        meta = _read_meta(folder) if meta is None else meta
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        self.offsets = np.load(folder / "offsets.npy")
        self.pad_id = meta["pad_id"]
        self._block_size = meta.get("block_size") or int(np.diff(self.offsets).max(initial=1))
        self.lengths = np.diff(self.offsets)  # padded per batch: the trainer groups similar lengths

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def block_size(self) -> int:
        return self._block_size

    def batch(self, example_ids) -> dict[str, torch.Tensor]:
        ids = np.asarray(example_ids, dtype=np.int64)
        input_ids, _ = _pad_right(self.input_ids, self.offsets, ids, self.pad_id)
        labels, _ = _pad_right(self.labels, self.offsets, ids, IGNORE_INDEX)
        return {"input_ids": _tensor(input_ids), "labels": _tensor(labels)}

    def real_tokens(self, example_ids) -> int:
        ids = np.asarray(example_ids, dtype=np.int64)
        return int((self.offsets[ids + 1] - self.offsets[ids]).sum())


def _pad_right(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples `rows` of a flat array as [len(rows), longest of them], right-padded with `pad`,
    and the mask of real slots."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    real = np.arange(int(lengths.max(initial=0)))[None, :] < lengths[:, None]
    out = np.full(real.shape, pad, dtype=np.int64)
    # Real slots in row-major order are the examples' tokens one after another.
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(rows) else np.zeros(0, np.int64)
    out[real] = values[np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))]
    return out, real


class ClassifiedTexts:
    """Classification: texts padded per batch, an attention mask (a classifier pools over real
    tokens), and one class id per example as `labels`."""

    def __init__(self, folder: str | Path, meta: dict | None = None):
        folder = Path(folder)
        meta = _read_meta(folder) if meta is None else meta
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.offsets = np.load(folder / "offsets.npy")
        self.class_ids = np.load(folder / "class_ids.npy")
        self.pad_id, self.block_size, self.label_names = meta["pad_id"], meta["block_size"], meta.get("label_names")
        self.lengths = np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.class_ids)

    def batch(self, example_ids) -> dict[str, torch.Tensor]:
        rows = np.asarray(example_ids, dtype=np.int64)
        ids, mask = _pad_right(self.input_ids, self.offsets, rows, self.pad_id)
        return {"input_ids": _tensor(ids), "attention_mask": _tensor(mask), "labels": _tensor(self.class_ids[rows])}

    def real_tokens(self, example_ids) -> int:
        rows = np.asarray(example_ids, dtype=np.int64)
        return int((self.offsets[rows + 1] - self.offsets[rows]).sum())


class SourceTargetPairs:
    """Seq2seq: sources padded per batch with an attention mask (the encoder attends both ways),
    targets padded with -100 as `labels` (an encoder-decoder model shifts them itself)."""

    def __init__(self, folder: str | Path, meta: dict | None = None):
        folder = Path(folder)
        meta = _read_meta(folder) if meta is None else meta
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.offsets = np.load(folder / "offsets.npy")
        self.target_ids = np.load(folder / "target_ids.npy", mmap_mode="r")
        self.target_offsets = np.load(folder / "target_offsets.npy")
        self.pad_id, self.block_size = meta["pad_id"], meta["block_size"]
        self.lengths = np.diff(self.offsets) + np.diff(self.target_offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, example_ids) -> dict[str, torch.Tensor]:
        rows = np.asarray(example_ids, dtype=np.int64)
        ids, mask = _pad_right(self.input_ids, self.offsets, rows, self.pad_id)
        labels, _ = _pad_right(self.target_ids, self.target_offsets, rows, IGNORE_INDEX)
        return {"input_ids": _tensor(ids), "attention_mask": _tensor(mask), "labels": _tensor(labels)}

    def real_tokens(self, example_ids) -> int:
        rows = np.asarray(example_ids, dtype=np.int64)
        both = self.offsets[rows + 1] - self.offsets[rows] + self.target_offsets[rows + 1] - self.target_offsets[rows]
        return int(both.sum())


class PreferencePairs(Examples):
    """Preference (DPO): pair i is sequences 2i (chosen) and 2i + 1 (rejected) of the `none` layout
    (data/preference_tokens.py). A batch of n pairs is 2n right-padded rows, the n chosen first,
    with the reference model's log-probabilities of each row as `reference_logps` (float64 [2n])
    when the reference stage's output was given."""

    def __init__(self, folder: str | Path, meta: dict | None = None, reference: np.ndarray | None = None):
        super().__init__(folder, meta)
        pairs = len(self.offsets) // 2
        if reference is not None and reference.shape != (pairs, 2):
            raise ValueError(f"{folder}: reference log-probabilities have shape {reference.shape}, the split {pairs} pairs")
        self.reference = reference
        self.lengths = np.diff(self.offsets).reshape(pairs, 2).max(axis=1)  # a pair pads to its longer answer

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, pair_ids) -> np.ndarray:
        ids = np.asarray(pair_ids, dtype=np.int64)
        return np.concatenate([2 * ids, 2 * ids + 1])

    def batch(self, pair_ids) -> dict[str, torch.Tensor]:
        out = super().batch(self.rows(pair_ids))
        if self.reference is not None:
            ids = np.asarray(pair_ids, dtype=np.int64)
            out["reference_logps"] = torch.from_numpy(np.concatenate([self.reference[ids, 0], self.reference[ids, 1]]))
        return out

    def real_tokens(self, pair_ids) -> int:
        return super().real_tokens(self.rows(pair_ids))


REFERENCE_LOGPS = "reference_logps.npy"
"""The reference stage's file per split: float64 [pairs, 2], (chosen, rejected) log-probabilities."""


def open_split(folder: str | Path, reference: str | Path | None = None):
    """The loader for a committed split folder, chosen by the task and packing in ../meta.json.
    `reference`: the reference stage's output (task preference), whose same-named split it reads."""
    folder = Path(folder)
    meta = _read_meta(folder)
    task = meta.get("task", "causal_lm")
    if task == "preference":
        logps = np.load(Path(reference) / folder.name / REFERENCE_LOGPS) if reference is not None else None
        return PreferencePairs(folder, meta, logps)
    if task == "classification":
        return ClassifiedTexts(folder, meta)
    if task == "seq2seq":
        return SourceTargetPairs(folder, meta)
    # Outputs written before packing modes existed have no "packing" key: they are concat.
    packing = meta.get("packing", "concat")
    loaders = {"concat": PackedBlocks, "bins": BinnedBlocks, "none": Examples}
    if packing not in loaders:
        raise ValueError(f"{folder.parent / 'meta.json'}: unknown packing {packing!r}")
    return loaders[packing](folder, meta)


LENGTH_GROUP = 64
"""Rows padded per batch are drawn in groups of this many consecutive samples, sorted by length
inside each group, so a micro-batch holds rows of similar length (HF's group_by_length idea)."""


@lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int, epoch: int, lengths: bytes | None) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    if lengths is not None:
        # Sort each group of LENGTH_GROUP by length (stable: ties keep the shuffled order). The
        # stream stays a pure function of (seed, epoch, i), independent of batch and world size,
        # and padding per batch drops (quickstart rows, batch 8: 0.86 of slots real -> 0.97).
        length_of = np.frombuffer(lengths, dtype=np.int64)[order]
        for start in range(0, num_rows, LENGTH_GROUP):
            group = slice(start, start + LENGTH_GROUP)
            order[group] = order[group][np.argsort(length_of[group], kind="stable")]
    return order


def sample_ids(start: int, count: int, num_blocks: int, seed: int, lengths: np.ndarray | bytes | None = None) -> np.ndarray:
    """Row ids of global samples [start, start + count) of the endless, epoch-shuffled stream.

    `lengths` (rows padded per batch): group rows of similar length, see LENGTH_GROUP. A caller
    drawing many batches passes them as int64 bytes, made once (they are the order's cache key)."""
    key = lengths if lengths is None or isinstance(lengths, bytes) else np.ascontiguousarray(lengths, dtype=np.int64).tobytes()
    out = np.empty(count, dtype=np.int64)
    for j, i in enumerate(range(start, start + count)):
        epoch, pos = divmod(i, num_blocks)
        out[j] = _epoch_order(num_blocks, seed, epoch, key)[pos]
    return out


def held_out_batches(num_rows: int, batch_size: int, max_batches: int) -> list[list[int]]:
    """Row ids, in batches, of the held-out rows to score: all of them, in order, when they fit in
    max_batches; else a fixed random subset (seed 0, sorted, the same on every run and rank).

    Not the first rows: splits keep the input's row order, so the head of a file sorted by label
    holds only its first classes (seen: 400 of 731 rows scored 2 of 6 classes, accuracy 0.91 and
    macro F1 0.54)."""
    limit = batch_size * max_batches
    ids = np.arange(num_rows) if num_rows <= limit else np.sort(np.random.default_rng(0).choice(num_rows, limit, replace=False))
    return [ids[b : b + batch_size].tolist() for b in range(0, len(ids), batch_size)]


def micro_batch_ids(
    samples_seen: int, micro_step: int, micro_batch_size: int, rank: int, world_size: int
) -> tuple[int, int]:
    """(start, count) in the global stream for one rank's micro-batch of the current step.

    A step consumes micro_batch_size x grad_accum x world_size consecutive samples starting at
    `samples_seen`; micro-step m, rank r takes the r-th slice of the m-th micro-slab.
    """
    slab = micro_batch_size * world_size
    start = samples_seen + micro_step * slab + rank * micro_batch_size
    return start, micro_batch_size
