"""Text normalisation for the preprocess stage: one vectorised function built from the config.

    normalize = make_normalizer(cfg.preprocess)
    normalize(["The  Café, 2024!"]).to_pylist()   # ['café'] with every flag on

The steps run in a fixed order, each only when its flag is set: Unicode NFC, lowercase,
punctuation, digits, stop words, whitespace. Punctuation goes before stop words so that
"the," still matches "the" (and "don't" becomes "dont", which the list then matches too).

Every step is a pyarrow.compute kernel (RE2 in C++ over a whole batch): one pass per enabled
step instead of one Python call per row and step.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PreprocessConfig

STOPWORDS_PATH = Path(__file__).with_name("stopwords_en.txt")

# RE2's \b, \d and \s are ASCII-only: "naïve" would have a word boundary inside it, and
# Arabic-Indic digits or a no-break space would survive. These classes spell out the Unicode
# meaning, as Python's `re` has it for str patterns.
_WORD_CHARS = r"\p{L}\p{M}\p{N}_"
_WHITESPACE = r"[\p{Z}\t\n\x0B\f\r\x{1C}-\x{1F}\x{85}]"  # the characters str.isspace() accepts
# The same set less the plain space (RE2 has no class subtraction, so the Z category is spelled out).
_OTHER_WHITESPACE = r"[\t\n\x0B\f\r\x{1C}-\x{1F}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}]"
# Marks where a stop word was, until the spaces around it are tidied. A Unicode noncharacter:
# reserved for a program's internal use, so it does not occur in real text.
_HOLE = "\ufdd0"

Normalizer = Callable[[pa.Array | pa.ChunkedArray | Iterable[str | None]], pa.Array]


def load_stopwords(path: Path = STOPWORDS_PATH) -> list[str]:
    """The stop-word list: one word a line; blank lines and `#` comment lines are skipped."""
    lines = (line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def stopwords_digest(path: Path = STOPWORDS_PATH) -> str:
    """sha256 of the shipped list: it changes what `remove_stopwords` produces, like code does."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stopword_patterns(words: Iterable[str], punctuation_stripped: bool = False) -> tuple[str, str]:
    """RE2 patterns matching any listed word as a whole word, in any case: (any text, ASCII-only text).

    The first has the characters on either side (or nothing, at the ends) as groups 1 and 2,
    so that a replacement can put them back; the second uses RE2's `\\b`, exact for ASCII text.
    """
    variants = set(words)
    if punctuation_stripped:
        # The punctuation step has already turned "don't" into "dont".
        variants |= {w.replace("'", "") for w in variants if "'" in w}
    typographic = {w.replace("'", "\u2019") for w in variants if "'" in w}  # don’t

    def alternation(words: set[str]) -> str:
        # Longest first: RE2 takes the first alternative that matches, and "don" must not win over "don't".
        return "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))

    any_text = rf"(^|[^{_WORD_CHARS}])(?i:{alternation(variants | typographic)})($|[^{_WORD_CHARS}])"
    ascii_text = rf"(?i)\b(?:{alternation(variants)})\b"
    return any_text, ascii_text


def mark_stopwords(values: pa.Array, patterns: tuple[str, str]) -> pa.Array:
    """Replace every stop word by a hole, keeping the characters around it."""
    any_text, ascii_text = patterns
    # RE2 runs a pattern without groups as a DFA, about five times faster than one with groups.
    # Its \b is ASCII-only ("ma" would match inside "maître"), so only rows that are all ASCII,
    # where \b is exactly a word boundary, take that path.
    marked = pc.replace_substring_regex(values, ascii_text, _HOLE)
    unicode_rows = pc.invert(pc.fill_null(pc.string_is_ascii(values), True))
    if not pc.any(unicode_rows).as_py():
        return marked
    rest = pc.filter(values, unicode_rows)
    # A match takes the separator on each side, so in "of the" the match for "of" eats the space
    # that "the" needs as its left boundary. After one pass no two survivors share a separator,
    # so a second pass removes the words the first one skipped.
    for _ in range(2):
        rest = pc.replace_substring_regex(rest, any_text, rf"\1{_HOLE}\2")
    return pc.replace_with_mask(marked, unicode_rows, rest)


def remove_stopwords(values: pa.Array, patterns: tuple[str, str]) -> pa.Array:
    values = mark_stopwords(values, patterns)
    # Tidy the holes so removal leaves no doubled or edge spaces ("cat the dog" -> "cat dog"),
    # while whitespace away from a removed word stays as it was. A run of holes and spaces goes
    # at either end of the text and next to other whitespace ("and\nthe dog" -> "\ndog"); a
    # run with a space in it becomes one space; holes between non-spaces ("(the)" -> "()") vanish.
    run = f"[ {_HOLE}]*{_HOLE}[ {_HOLE}]*"
    values = pc.replace_substring_regex(values, f"^{run}|{run}$", "")
    values = pc.replace_substring_regex(values, f"{run}({_OTHER_WHITESPACE})", r"\1")
    values = pc.replace_substring_regex(values, f"({_OTHER_WHITESPACE}){run}", r"\1")
    values = pc.replace_substring_regex(values, f" +{_HOLE}[ {_HOLE}]*|{_HOLE}+ [ {_HOLE}]*", " ")
    return pc.replace_substring(values, _HOLE, "")


def collapse_whitespace(values: pa.Array) -> pa.Array:
    # Only what needs changing is matched (runs, and single characters other than a space):
    # replacing every lone space by itself made this step about seven times slower.
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(values, f"{_WHITESPACE}{{2,}}|{_OTHER_WHITESPACE}", " "))


def make_normalizer(cfg: PreprocessConfig) -> Normalizer:
    """A function from texts (a pyarrow string array, or a list of str) to normalised texts.

    Nulls stay null. With every flag off it returns its input unchanged (as an array).
    """
    steps: list[Callable[[pa.Array], pa.Array]] = []
    if cfg.unicode_nfc:
        steps.append(lambda v: pc.utf8_normalize(v, "NFC"))
    if cfg.lowercase:
        steps.append(pc.utf8_lower)
    if cfg.strip_punctuation:
        steps.append(lambda v: pc.replace_substring_regex(v, r"\p{P}", ""))
    if cfg.strip_digits:
        steps.append(lambda v: pc.replace_substring_regex(v, r"\p{Nd}", ""))
    if cfg.remove_stopwords:
        patterns = stopword_patterns(load_stopwords(), punctuation_stripped=cfg.strip_punctuation)
        steps.append(lambda v: remove_stopwords(v, patterns))
    if cfg.collapse_whitespace:
        steps.append(collapse_whitespace)

    def normalize(values: pa.Array | pa.ChunkedArray | Iterable[str | None]) -> pa.Array:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()  # pc.replace_with_mask takes arrays
        elif not isinstance(values, pa.Array):
            values = pa.array(list(values), pa.string())
        for step in steps:
            values = step(values)
        return values

    return normalize
