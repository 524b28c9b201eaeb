"""Pre-packed training blocks, read through memory maps, in an order that is a pure function.

The tokenize stage commits `<split>/input_ids.npy` and `<split>/labels.npy` ([blocks, length]
int32). The trainer never tokenizes. Which block comes `i`-th in the stream depends only on
(seed, epoch, i): epoch = i // blocks, and each epoch is a seeded permutation. So resuming is
O(1) from a single integer, `samples_seen`, and a resume at another world size continues at
the same sample, with no duplicate and no gap.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


class PackedBlocks:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 2:
            raise ValueError(f"{folder}: input_ids {self.input_ids.shape} and labels {self.labels.shape} disagree")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def block_size(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, block_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Sorted reads are kinder to the page cache; the order within a batch does not matter
        # for the summed loss, but we keep the given order so logged sample ids stay exact.
        ids = torch.from_numpy(np.asarray(self.input_ids[block_ids], dtype=np.int64))
        labels = torch.from_numpy(np.asarray(self.labels[block_ids], dtype=np.int64))
        return ids, labels


@lru_cache(maxsize=4)
def _epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_blocks)


def sample_ids(start: int, count: int, num_blocks: int, seed: int) -> np.ndarray:
    """Block ids of global samples [start, start + count) of the endless, epoch-shuffled stream."""
    out = np.empty(count, dtype=np.int64)
    for j, i in enumerate(range(start, start + count)):
        epoch, pos = divmod(i, num_blocks)
        out[j] = _epoch_permutation(num_blocks, seed, epoch)[pos]
    return out


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
