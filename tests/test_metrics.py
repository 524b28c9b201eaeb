"""Accuracy, macro-F1 and ROUGE-L against hand-computed values (and scikit-learn, where installed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.evaluate.metrics import accuracy, class_counts, lcs_length, macro_f1, rouge_l, rouge_l_pair, rouge_tokens

LABELS = [0, 1, 2, 2, 1]
PREDICTED = [0, 2, 2, 2, 1]


def test_accuracy_and_class_counts():
    assert accuracy(LABELS, PREDICTED) == pytest.approx(4 / 5)
    assert class_counts(LABELS, PREDICTED) == {
        0: {"support": 1, "predicted": 1, "correct": 1},
        1: {"support": 2, "predicted": 1, "correct": 1},
        2: {"support": 2, "predicted": 3, "correct": 2},
    }


def test_macro_f1_by_hand():
    # Per class F1 = 2tp / (2tp + fp + fn): class 0 -> 1, class 1 -> 2/3, class 2 -> 4/5.
    assert macro_f1(LABELS, PREDICTED) == pytest.approx((1 + 2 / 3 + 4 / 5) / 3)
    # A class only predicted counts with F1 0 (sklearn's union of labels and predictions) ...
    assert macro_f1([0, 0, 1], [0, 2, 1]) == pytest.approx((2 / 3 + 1 + 0) / 3)
    # ... and one absent from both does not count at all: perfect predictions score 1.
    assert macro_f1([0, 0, 3], [0, 0, 3]) == 1.0
    assert macro_f1([1, 1], [0, 0]) == 0.0


def test_macro_f1_agrees_with_sklearn_on_random_labels():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, p = rng.integers(0, 5, 40), rng.integers(0, 6, 40)
        assert macro_f1(y, p) == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro"), abs=1e-12)
        assert accuracy(y, p) == pytest.approx(sklearn_metrics.accuracy_score(y, p))


def test_mismatched_or_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no examples"):
        macro_f1([], [])
    with pytest.raises(ValueError, match="no examples"):
        rouge_l([], [])


def test_rouge_tokens_follow_rouge_score():
    # Lowercase; anything but ASCII a-z0-9 separates; non-ASCII letters vanish (as in rouge-score).
    assert rouge_tokens("Don't STOP-me, café 42!") == ["don", "t", "stop", "me", "caf", "42"]
    assert rouge_tokens(" ... ") == []


def textbook_lcs(a, b) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, j in itertools.product(range(len(a)), range(len(b))):
        table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_lcs_matches_the_textbook_table():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = list(rng.choice(list("abcd"), rng.integers(0, 12)))
        b = list(rng.choice(list("abcd"), rng.integers(0, 12)))
        assert lcs_length(a, b) == textbook_lcs(a, b)


def test_rouge_l_by_hand():
    # LCS "the cat on mat" = 4; P = 4/5, R = 4/6, F1 = 2PR / (P + R) = 8/11.
    assert rouge_l_pair("The cat sat on the mat.", "the cat on a mat") == pytest.approx(8 / 11)
    assert rouge_l_pair("a b c d", "d c b a") == pytest.approx(0.25)  # order matters: LCS 1
    assert rouge_l_pair("same words", "Same, words!") == 1.0
    assert rouge_l_pair("", "anything") == rouge_l_pair("text", "!!!") == 0.0
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)  # the mean over pairs
