"""A real labelled text set, offline: Debian package descriptions labelled by archive section.

Every Debian or Ubuntu machine that has run `apt-get update` holds the archive's package index
(/var/lib/apt/lists/*_Packages*): tens of thousands of one-line descriptions written by package
maintainers, each filed under a section (games, science, sound, ...). Nobody here wrote them.

    python examples/debian_corpus.py runs/data/debian6.csv     # columns text,label

One row per *source* package: the binaries built from one source (foo, foo-tools, python3-foo)
share their wording, so keeping them all would put near-copies on both sides of a train/validation
split. Rows come grouped by section, in the index's (package name) order.
"""

from __future__ import annotations

import argparse
import csv
import glob
import gzip
import lzma
import re
import shutil
import subprocess
from pathlib import Path

SECTIONS = ("games", "science", "sound", "fonts", "graphics", "mail")
"""Topics a reader tells apart from one line; ~3,600 source packages in Debian 12 (bookworm) main."""

INDEX_GLOB = "/var/lib/apt/lists/*_main_binary-*_Packages*"
# Packaging splits whose one-liner describes the split ("development files for ..."), not the topic.
_SPLIT_PACKAGE = re.compile(r"-(dev|doc|dbg|dbgsym|data|common)$")


def read_index(pattern: str = INDEX_GLOB) -> str:
    """The text of the first package index matching `pattern`, decompressed."""
    paths = sorted(p for p in glob.glob(pattern) if not p.endswith(".diff_Index"))
    if not paths:
        raise FileNotFoundError(f"no Debian package index matches {pattern}: run `apt-get update` first")
    path = paths[0]
    if path.endswith(".gz"):
        return gzip.decompress(Path(path).read_bytes()).decode()
    if path.endswith(".xz"):
        return lzma.decompress(Path(path).read_bytes()).decode()
    if path.endswith(".lz4"):  # no lz4 in the stdlib; apt's own helper reads every compression apt writes
        helper = shutil.which("apt-helper") or "/usr/lib/apt/apt-helper"
        return subprocess.run([helper, "cat-file", path], check=True, capture_output=True, text=True).stdout
    return Path(path).read_text()


def stanzas(index: str):
    """Each package's fields as a dict (continuation lines dropped: only one-line fields are used)."""
    for block in index.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
        if "Package" in fields:
            yield fields


def build_rows(sections=SECTIONS, index: str | None = None) -> list[tuple[str, str]]:
    """(description, section) rows, one per source package, grouped by section in `sections` order."""
    seen_sources: set[str] = set()
    seen_texts: set[str] = set()
    by_section: dict[str, list[tuple[str, str]]] = {s: [] for s in sections}
    for fields in stanzas(index if index is not None else read_index()):
        section = fields.get("Section", "").split("/")[-1]  # "contrib/games" -> "games"
        source = fields.get("Source", fields["Package"]).split()[0]  # "foo (1.2-1)" -> "foo"
        text = fields.get("Description", "").strip()
        if section not in by_section or _SPLIT_PACKAGE.search(fields["Package"]) or not text:
            continue
        if source in seen_sources or text.lower() in seen_texts:
            continue
        seen_sources.add(source)
        seen_texts.add(text.lower())
        by_section[section].append((text, section))
    return [row for s in sections for row in by_section[s]]


def write_csv(path: str | Path, rows: list[tuple[str, str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="CSV to write (columns text,label)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated Debian sections (default: %(default)s)")
    args = parser.parse_args()
    rows = build_rows(tuple(args.sections.split(",")))
    write_csv(args.out, rows)
    counts = {s: sum(1 for _, label in rows if label == s) for s in args.sections.split(",")}
    print(f"{len(rows)} rows -> {args.out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))


if __name__ == "__main__":
    main()
