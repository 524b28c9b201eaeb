import pyarrow as pa
import pytest

from pipeline.config import PreprocessConfig
from pipeline.data.normalize import STOPWORDS_PATH, load_stopwords, make_normalizer


def normalized(texts: list, **flags) -> list:
    return make_normalizer(PreprocessConfig(**flags))(texts).to_pylist()


def test_no_flags_leaves_text_alone():
    texts = ["  The Café, 2024!\n", "e\u0301", None, ""]
    assert normalized(texts) == texts


def test_nfc_composes_characters():
    assert normalized(["e\u0301", "Cafe\u0301"], unicode_nfc=True) == ["é", "Café"]
    assert normalized(["e\u0301"]) == ["e\u0301"]


def test_lowercase_is_unicode_aware():
    assert normalized(["HeLLo ÉCOLE ΣΟΦΙΑ"], lowercase=True) == ["hello école σοφια"]


def test_strip_punctuation_removes_unicode_category_p_only():
    # "$", "+" and "^" are symbols (category S), not punctuation.
    assert normalized(["Hi, you! ¿Qué? — «ok» $5+1^2"], strip_punctuation=True) == ["Hi you Qué  ok $5+1^2"]


def test_strip_digits_removes_every_decimal_digit():
    assert normalized(["a1b22 c٣ ３"], strip_digits=True) == ["ab c "]


def test_collapse_whitespace_collapses_unicode_spaces_and_trims():
    assert normalized(["  a\u00a0\u3000b\n\n\tc \r\n"], collapse_whitespace=True) == ["a b c"]


def test_stopwords_are_whole_words_in_any_case():
    got = normalized(["The cat sat ON the mat", "Theory of them", "naïve thé", "don't stop"], remove_stopwords=True)
    # "Theory" and "thé" merely start with a stop word; "don't" is one word of the list.
    assert got == ["cat sat mat", "Theory", "naïve thé", "stop"]


def test_stopword_removal_leaves_no_doubled_or_edge_spaces_but_keeps_other_whitespace():
    got = normalized(["of the  cat", "cat and\nthe dog", "a (the) b", "big  cat the"], remove_stopwords=True)
    assert got[0] == "cat"
    assert got[1] == "cat\ndog"  # the line break stays; the spaces the removals left beside it go
    assert got[2] == "() b"  # "a" goes with its space; "(the)" keeps its brackets
    assert got[3] == "big  cat"  # the double space between two kept words is not the removal's doing


def test_stopwords_in_ascii_and_unicode_rows_are_removed_alike():
    # All-ASCII rows take a faster path than the others; both must give the same result.
    texts = ["Of the cat, and THE dog's bone (a) don't", "Of the cat, and THE dog's bone (a) don't é"]
    assert normalized(texts, remove_stopwords=True) == ["cat, dog' bone ()", "cat, dog' bone () é"]
    assert normalized(["ma maître", "ma maitre"], remove_stopwords=True) == ["maître", "maitre"]


def test_stopwords_after_punctuation_match_the_apostrophe_free_form():
    got = normalized(["Don't, the end.", "don’t go"], strip_punctuation=True, remove_stopwords=True)
    assert got == ["end", "go"]


def test_all_flags_together_in_order():
    cfg = dict(unicode_nfc=True, lowercase=True, strip_punctuation=True, strip_digits=True, remove_stopwords=True, collapse_whitespace=True)
    assert normalized(["  The Cafe\u0301, in 2024!\n\nIt's   OPEN.  ", None], **cfg) == ["café open", None]


def test_accepts_arrow_arrays_and_keeps_nulls():
    normalize = make_normalizer(PreprocessConfig(lowercase=True))
    chunked = pa.chunked_array([["A", None], ["B"]])
    assert normalize(chunked).to_pylist() == ["a", None, "b"]


def test_shipped_stopword_list():
    words = load_stopwords()
    assert 150 <= len(words) <= 180
    assert len(set(words)) == len(words)
    assert all(w == w.lower() and w.strip() == w and " " not in w for w in words)
    assert {"the", "and", "of", "don't", "wouldn't"} <= set(words)
    assert STOPWORDS_PATH.read_text().startswith("#")  # the source and licence line


@pytest.mark.parametrize("text", ["", "   ", "the a an"])
def test_empty_results_are_empty_strings(text):
    assert normalized([text], remove_stopwords=True, collapse_whitespace=True) == [""]
