"""examples/debian_corpus.py: one row per source package, split packages and repeats left out."""

from __future__ import annotations

import sys

from tiny import REPO

sys.path.insert(0, str(REPO / "examples"))
import debian_corpus  # noqa: E402

INDEX = """\
Package: 0ad
Source: 0ad-src (0.0.26-3)
Section: games
Description: Real-time strategy game of ancient warfare

Package: 0ad-data
Source: 0ad-src
Section: games
Description: Real-time strategy game of ancient warfare (data files)

Package: 0ad-tools
Source: 0ad-src
Section: games
Description: tools for the strategy game

Package: gnuplot
Section: math
Description: Command-line driven interactive plotting program
 A long description, continued
 .
 over lines, is not used.

Package: octave
Section: science
Description: GNU Octave language for numerical computations

Package: libfoo-dev
Source: foo
Section: science
Description: development files for foo

Package: nethack
Section: contrib/games
Description: dungeon crawl game

Package: nethack-clone
Section: games
Description: Dungeon crawl game
"""


def test_one_row_per_source_package_by_section():
    rows = debian_corpus.build_rows(("games", "science"), index=INDEX)
    assert rows == [
        ("Real-time strategy game of ancient warfare", "games"),  # 0ad-tools shares its source
        ("dungeon crawl game", "games"),  # contrib/games is games; the case-only repeat is dropped
        ("GNU Octave language for numerical computations", "science"),  # libfoo-dev is a split package
    ]


def test_written_csv_reads_back(tmp_path):
    import csv

    rows = debian_corpus.build_rows(("math",), index=INDEX)
    path = debian_corpus.write_csv(tmp_path / "out" / "rows.csv", rows)
    with path.open(newline="") as f:
        assert list(csv.DictReader(f)) == [{"text": "Command-line driven interactive plotting program", "label": "math"}]
