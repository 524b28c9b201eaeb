"""Evaluation metrics in plain numpy: accuracy, macro-F1, ROUGE-L.

    accuracy([0, 1, 1], [0, 1, 0])          # 0.667
    macro_f1([0, 1, 1], [0, 1, 0])          # 0.667, sklearn's f1_score(average="macro")
    rouge_l(["the cat sat"], ["a cat sat"]) # 0.667, rouge-score's rougeL F1, averaged over pairs

No scikit-learn or rouge-score dependency: the definitions are short and are pinned here by
tests against hand-computed values, so a library upgrade cannot move a gated number.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np


def _labels(labels, predictions) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    if len(y) == 0:
        raise ValueError("no examples to score")
    return y, p


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    y, p = _labels(labels, predictions)
    return float(np.mean(y == p))


def class_counts(labels: Sequence[int], predictions: Sequence[int]) -> dict[int, dict[str, int]]:
    """Per class present in labels or predictions: support (true count), predicted, correct."""
    y, p = _labels(labels, predictions)
    return {
        int(c): {"support": int(np.sum(y == c)), "predicted": int(np.sum(p == c)), "correct": int(np.sum((y == c) & (p == c)))}
        for c in np.union1d(y, p)
    }


def macro_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions.

    This is scikit-learn's `f1_score(y, p, average="macro")` with its default `labels=None`: a
    class nobody predicted and nobody labelled does not count, one that was only predicted (or
    only labelled) counts with F1 0. Per class F1 = 2 tp / (2 tp + fp + fn), which equals
    2 P R / (P + R) and is 0 where sklearn's zero_division would be hit.
    """
    f1s = []
    for counts in class_counts(labels, predictions).values():
        tp = counts["correct"]
        fp, fn = counts["predicted"] - tp, counts["support"] - tp
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


# ---------------------------------------------------------------- ROUGE-L

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer (no stemmer): lowercase, then every run of characters
    other than ASCII a-z / 0-9 separates tokens. So punctuation splits words ("don't" -> don, t)
    and, as in rouge-score, non-ASCII letters are dropped ("café" -> caf): scores on text that is
    not mostly English say little."""
    return _NOT_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, one numpy row of the DP table at a time.

    Row recurrence: t[j] = max(prev[j], prev[j-1] + [a_i == b_j]); the row is then the running
    max of t along j, which is the dp[i][j-1] term of the textbook recurrence.
    """
    if not a or not b:
        return 0
    vocab: dict[str, int] = {}
    a_ids = np.array([vocab.setdefault(t, len(vocab)) for t in a])
    b_ids = np.array([vocab.setdefault(t, len(vocab)) for t in b])
    row = np.zeros(len(b_ids) + 1, np.int64)
    for token in a_ids:
        t = np.maximum(row[1:], row[:-1] + (b_ids == token))
        row[1:] = np.maximum.accumulate(t)
    return int(row[-1])


def rouge_l_pair(reference: str, prediction: str) -> float:
    """ROUGE-L F1 of one prediction against one reference (rouge-score's `rougeL` fmeasure):
    P = LCS / prediction tokens, R = LCS / reference tokens, F1 = 2PR / (P + R); 0 when either
    side has no tokens."""
    ref, pred = rouge_tokens(reference), rouge_tokens(prediction)
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean of the per-pair ROUGE-L F1 (rouge-score scores pairs; corpus figures average them)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no examples to score")
    return float(np.mean([rouge_l_pair(r, p) for r, p in zip(references, predictions)]))


# ---------------------------------------------------------------- ROUGE-N


def rouge_n_pair(reference: str, prediction: str, n: int) -> float:
    """ROUGE-N F1 of one pair (rouge-score's `rouge1`/`rouge2` fmeasure): n-grams of the same
    tokens as ROUGE-L, their overlap clipped by count (an n-gram said twice matches at most as
    often as the reference has it); 0 when either side has no n-gram."""
    ref, pred = _ngrams(rouge_tokens(reference), n), _ngrams(rouge_tokens(prediction), n)
    overlap = sum(min(count, pred[gram]) for gram, count in ref.items() if gram in pred)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def rouge(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean per-pair ROUGE-1, ROUGE-2 and ROUGE-L F1: {"rouge_1", "rouge_2", "rouge_l"}."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no examples to score")
    pairs = list(zip(references, predictions))
    return {
        "rouge_1": float(np.mean([rouge_n_pair(r, p, 1) for r, p in pairs])),
        "rouge_2": float(np.mean([rouge_n_pair(r, p, 2) for r, p in pairs])),
        "rouge_l": float(np.mean([rouge_l_pair(r, p) for r, p in pairs])),
    }
