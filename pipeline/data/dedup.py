"""Duplicate detection for the sample stage: exact (normalised text) and near (MinHash LSH).

Rows arrive batch by batch in their global order and a row is kept when nothing before it
matched, so the first occurrence always survives. Only small per-row state is kept: a 64-bit
hash per row (exact) and the LSH band keys of the kept rows (minhash: about 1 KB a row, the
index is the memory cost of near-duplicate detection).

    dedup = Deduplicator("minhash", threshold=0.8, num_perm=128, seed=0)
    for texts in batches:                    # normalised texts, see `row_texts`
        dedup.add(texts)
    keep, exact_removed, near_removed = dedup.finish()
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash, MinHashLSH

# Joins the columns of a row. A unit separator cannot survive `normalise` (str.split treats it as
# whitespace), so ("a b", "c") and ("a", "b c") can never produce the same joined text.
COLUMN_SEPARATOR = "\x1f"
SHINGLE_WORDS = 3
# Upper bound on shingles hashed against all permutations at once: num_perm x 65536 x 4 bytes
# (32 MiB at 128 permutations), whatever the row lengths.
_SHINGLES_PER_SLICE = 1 << 16


def normalise(text: str | None) -> str:
    """NFKC, casefold, whitespace runs to one space, trimmed: what makes two texts 'the same'."""
    if not text:
        return ""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def row_texts(columns: Sequence[Iterable[str | None]]) -> list[str]:
    """One normalised string per row from the given columns (values may be None)."""
    return [COLUMN_SEPARATOR.join(normalise(v) for v in row) for row in zip(*columns)]


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """64-bit BLAKE2b of each text. Two different texts collide with probability about
    n^2 / 2^65 (one in 300,000 for ten million rows), which would drop one row as a duplicate."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in texts)
    return np.frombuffer(digests, dtype="<u8").copy() if texts else np.zeros(0, np.uint64)


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """True for the first row of each distinct hash, False for the rows that repeat an earlier one."""
    _, first = np.unique(hashes, return_index=True)  # `first`: the earliest row of each value
    keep = np.zeros(len(hashes), bool)
    keep[first] = True
    return keep


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser, which datasketch's affine32 scheme applies to each input hash
    before permuting; repeated here so a whole batch is permuted in one numpy operation."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


# Odd 64-bit constants (golden ratio, xxHash prime) that mix one hash into the next.
_MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
# Stand-ins for missing words, so a text of fewer than three words still has one shingle.
_PAD = text_hashes([f"\x00pad{i}" for i in range(SHINGLE_WORDS)])


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hash of every word (split on whitespace, the column separator included), padded to
    at least three words a text, and each text's word count. Arrow splits the texts and finds the
    distinct words; only those are hashed in Python."""
    words = pc.utf8_split_whitespace(pa.array(texts, pa.string()))
    flat, row_of_word = pc.list_flatten(words), pc.list_parent_indices(words).to_numpy()
    real = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)  # "" and "a\x1f" give empty words
    distinct = pc.dictionary_encode(flat.filter(real))
    hashes = text_hashes(distinct.dictionary.to_pylist())[distinct.indices.to_numpy()]
    rows = row_of_word[real]
    counts = np.bincount(rows, minlength=len(texts))
    padded = np.maximum(counts, SHINGLE_WORDS)
    # Fill every row with the pads, then write the real words over the start of each row.
    padded_starts = np.cumsum(padded) - padded
    result = _PAD[np.minimum(np.arange(padded.sum()) - np.repeat(padded_starts, padded), SHINGLE_WORDS - 1)]
    position_in_row = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
    result[padded_starts[rows] + position_in_row] = hashes
    return result, padded


def shingle_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the word 3-grams of each text, and the row each belongs to (ascending).
    A 3-gram's hash combines its three word hashes in order; every text has at least one."""
    w, lengths = word_hashes(texts)
    row_of_word = np.repeat(np.arange(len(texts)), lengths)
    ends = np.repeat(np.cumsum(lengths), lengths)
    starts_a_shingle = np.arange(len(w)) + SHINGLE_WORDS <= ends
    combined = w.copy()
    combined[:-1] = combined[:-1] * _MIX1 ^ w[1:]  # uint64 arithmetic wraps: intended
    combined[:-2] = combined[:-2] * _MIX2 ^ w[2:]
    hashes = (combined[starts_a_shingle] >> np.uint64(32)).astype(np.uint32)
    return hashes, row_of_word[starts_a_shingle]


def signatures(hashes: np.ndarray, rows: np.ndarray, n_rows: int, permutations: np.ndarray) -> np.ndarray:
    """MinHash signatures [n_rows, num_perm], equal to datasketch `MinHash.update_batch` over each
    row's shingle hashes with an identity `hashfunc` (tests check this), but for a whole batch."""
    a, b = permutations[0][:, None], permutations[1][:, None]
    result = np.full((n_rows, len(permutations[0])), np.iinfo(np.uint32).max, np.uint32)
    mixed = _fmix32(hashes)
    for lo in range(0, len(mixed), _SHINGLES_PER_SLICE):
        part_rows = rows[lo : lo + _SHINGLES_PER_SLICE]
        # A row's shingles are contiguous, so a slice holds one run per row (the first and the
        # last run may continue in the neighbouring slices: hence the running minimum).
        run_starts = np.flatnonzero(np.r_[True, part_rows[1:] != part_rows[:-1]])
        permuted = a * mixed[None, lo : lo + _SHINGLES_PER_SLICE] + b  # uint32 wraps: mod 2^32
        run_min = np.minimum.reduceat(permuted, run_starts, axis=1).T
        row_ids = part_rows[run_starts]
        result[row_ids] = np.minimum(result[row_ids], run_min)
    return result


def band_keys(sigs: np.ndarray, bands: int, rows_per_band: int) -> np.ndarray:
    """[n_rows, bands] 64-bit keys: band i of a signature hashed with i, so equal values in
    different bands never meet."""
    banded = sigs[:, : bands * rows_per_band].reshape(len(sigs), bands, rows_per_band).astype(np.uint64)
    keys = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64), banded.shape[:2]).copy()
    for j in range(rows_per_band):
        keys = keys * _MIX1 ^ banded[:, :, j]
    return keys


class NearDuplicates:
    """MinHash LSH over word 3-gram shingles: a row is a near-duplicate when one of its bands
    equals that band of a row kept before it, as in datasketch's MinHashLSH, whose banding for
    the threshold (b bands of r values) is used.

    The index itself is one set of band keys rather than a MinHashLSH: its answers are the same
    (tests compare them) but MinHashLSH keeps a set per bucket and a key list per row, measured
    at 3.6 KB and 140 us a row, against about 1 KB and 7 us here.
    """

    def __init__(self, threshold: float, num_perm: int, seed: int):
        self.permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.rows_per_band = lsh.b, lsh.r
        self._seen: set[int] = set()

    def is_new(self, texts: Sequence[str]) -> np.ndarray:
        """For each text in order: True (and indexed) unless it is near an earlier kept text."""
        sigs = signatures(*shingle_hashes(texts), len(texts), self.permutations)
        new = np.zeros(len(texts), bool)
        for i, keys in enumerate(band_keys(sigs, self.bands, self.rows_per_band).tolist()):
            if self._seen.isdisjoint(keys):
                self._seen.update(keys)
                new[i] = True
        return new


class Deduplicator:
    """`mode` exact | minhash, as `sample.dedup` (for `none`, do not make one). Feed every batch
    of texts in row order to `add`, then `finish` says which rows to keep."""

    def __init__(self, mode: str, threshold: float = 0.8, num_perm: int = 128, seed: int = 0):
        self.mode = mode
        self._hashes: list[np.ndarray] = []
        self._near_flags: list[np.ndarray] = []
        self._near = NearDuplicates(threshold, num_perm, seed) if mode == "minhash" else None

    def add(self, texts: Sequence[str]) -> None:
        self._hashes.append(text_hashes(texts))
        if self._near is not None:
            # Exact duplicates go through the index too, and it never takes them in: a copy has
            # the signature of its original, so it meets whatever kept row the original met.
            # The index thus ends up as if it had only seen the exact survivors.
            self._near_flags.append(~self._near.is_new(texts))

    def finish(self) -> tuple[np.ndarray, int, int]:
        """(rows to keep, exact duplicates removed, near duplicates removed) over all rows added."""
        hashes = np.concatenate(self._hashes) if self._hashes else np.zeros(0, np.uint64)
        keep = first_occurrences(hashes)
        exact = int(len(keep) - keep.sum())
        if self._near is None:
            return keep, exact, 0
        near = np.concatenate(self._near_flags) & keep
        return keep & ~near, exact, int(near.sum())
