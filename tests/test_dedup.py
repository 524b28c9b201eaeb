"""Dedup helpers: normalisation, batched MinHash signatures equal to datasketch's, streaming verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash

from pipeline.data import dedup


@pytest.mark.parametrize(
    "variant",
    ["Café  Crème", " café crème\n", "CAFÉ\tCRÈME", "Cafe\u0301 Cre\u0300me", "Ｃａｆé Crème"],
    ids=["spaces", "trim", "case-and-tab", "decomposed", "fullwidth"],
)
def test_normalise_ignores_case_spacing_and_unicode_form(variant):
    assert dedup.normalise(variant) == "café crème"


def test_normalise_keeps_what_differs():
    assert dedup.normalise("Straße") == dedup.normalise("STRASSE")  # casefold, not lower
    assert dedup.normalise("a b") != dedup.normalise("ab")
    assert dedup.normalise(None) == dedup.normalise("") == ""


def test_columns_cannot_run_into_each_other():
    a, b = dedup.row_texts([["a b", "x"], ["c", None]])
    c, d = dedup.row_texts([["a", "x\x1f"], ["b c", ""]])

    assert a != c  # ("a b", "c") is not ("a", "b c")
    assert b == d == "x\x1f"  # a separator inside a value is whitespace, collapsed away


def test_every_text_has_its_word_3_grams_and_at_least_one():
    hashes, rows = dedup.shingle_hashes(["", "one", "one two", "one two three", "a b c d e", "one two three"])

    assert np.bincount(rows).tolist() == [1, 1, 1, 1, 3, 1]
    assert hashes[rows == 3][0] == hashes[rows == 5][0]  # same words, same shingle
    assert len({hashes[rows == r][0] for r in range(4)}) == 4  # padding keeps short texts apart


@pytest.mark.parametrize("slice_size", [65536, 5, 1])
def test_batched_signatures_equal_datasketch(monkeypatch, slice_size):
    """Whatever the slicing, each row's signature is what MinHash.update_batch gives for its shingles."""
    monkeypatch.setattr(dedup, "_SHINGLES_PER_SLICE", slice_size)
    texts = ["the quick brown fox jumps over the lazy dog", "", "hello world", "a b c d e f g h i j k l"]
    reference = MinHash(num_perm=32, seed=11)
    hashes, rows = dedup.shingle_hashes(texts)

    sigs = dedup.signatures(hashes, rows, len(texts), reference.permutations)

    for i in range(len(texts)):
        expected = MinHash(num_perm=32, seed=11, hashfunc=int)
        expected.update_batch(hashes[rows == i].tolist())
        assert sigs[i].tolist() == expected.hashvalues.tolist(), i


def test_exact_keeps_the_first_occurrence_across_batches():
    d = dedup.Deduplicator("exact")
    d.add(["a", "b", "a"])
    d.add(["c", "b"])
    d.add([])
    d.add(["a", "d"])

    keep, exact, near = d.finish()

    assert keep.tolist() == [True, True, False, True, False, False, True]
    assert (exact, near) == (3, 0)


def words(seed: int, n: int = 60) -> list[str]:
    return list(np.random.default_rng(seed).choice([f"w{i}" for i in range(5000)], size=n))


def test_minhash_counts_near_copies_apart_from_exact_copies():
    base = words(0)
    texts = [
        " ".join(base),
        " ".join(words(1)),
        " ".join(base[:30] + ["other"] + base[31:]),  # near row 0
        " ".join(base),  # exact copy of row 0
        " ".join(words(2)),
        " ".join(base[:30] + ["other"] + base[31:]),  # exact copy of row 2, itself near row 0
    ]
    verdicts = []
    for batch_size in (6, 2, 1):
        d = dedup.Deduplicator("minhash", threshold=0.8, num_perm=128, seed=0)
        for start in range(0, len(texts), batch_size):
            d.add(texts[start : start + batch_size])
        keep, exact, near = d.finish()
        verdicts.append((keep.tolist(), exact, near))

    assert verdicts[0] == ([True, True, False, False, True, False], 2, 1)
    assert verdicts[1] == verdicts[2] == verdicts[0]


def test_minhash_keeps_rows_below_the_threshold():
    base = words(3, n=40)
    half = base[:20] + words(4, n=20)  # about a third of the 3-grams shared
    d = dedup.Deduplicator("minhash", threshold=0.8, num_perm=128, seed=0)
    d.add([" ".join(base), " ".join(half)])

    keep, exact, near = d.finish()

    assert keep.tolist() == [True, True] and near == 0


def test_band_index_gives_the_verdicts_of_datasketch_minhash_lsh():
    """The in-house band set answers as MinHashLSH does, row by row, near the threshold too."""
    from datasketch import MinHashLSH

    rng = np.random.default_rng(5)
    originals = [words(100 + i, n=60) for i in range(20)]
    texts = []
    for i in range(200):  # copies of the originals with 0 to 4 of their 60 words replaced
        text = list(originals[rng.integers(20)])
        for position in rng.choice(60, size=rng.integers(0, 5), replace=False):
            text[position] = f"x{rng.integers(10**6)}"
        texts.append(" ".join(text))
    d = dedup.Deduplicator("minhash", threshold=0.7, num_perm=64, seed=9)
    d.add(texts[:90])
    d.add(texts[90:])
    keep, _, _ = d.finish()

    lsh = MinHashLSH(threshold=0.7, num_perm=64)
    hashes, rows = dedup.shingle_hashes(texts)
    expected = []
    for i in range(len(texts)):
        m = MinHash(num_perm=64, seed=9, hashfunc=int)
        m.update_batch(hashes[rows == i].tolist())
        expected.append(not lsh.query(m))
        if expected[-1]:
            lsh.insert(i, m)

    assert keep.tolist() == expected
    assert 40 <= sum(expected) <= 160, sum(expected)  # both verdicts occur, not only on exact copies
