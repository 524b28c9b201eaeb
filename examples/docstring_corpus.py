"""A real labelled text corpus that nobody on this project wrote: the docstrings of Python's
standard library, labelled by the package they come from.

    python examples/docstring_corpus.py corpus.csv          # ~5k rows, columns text,label

The text is real technical English written by CPython's authors: multi-line (so the CSV has
quoted values spanning lines), with quotes, commas, code and Unicode. The classes are
naturally imbalanced. It is built offline from the interpreter's own source files (parsed with
`ast`, never imported), so it is the same on every machine with the same Python.
"""

from __future__ import annotations

import argparse
import ast
import csv
import sysconfig
from pathlib import Path

PACKAGES = (
    "asyncio", "email", "http", "logging", "multiprocessing", "unittest", "xml", "importlib",
    "urllib", "ctypes", "typing", "inspect", "argparse", "pathlib", "tarfile", "zipfile",
)
"""Packages and single modules present from Python 3.10 to 3.13 (each is one class)."""
MIN_CHARS = 40


def docstrings(package: str) -> list[str]:
    """Module, class and function docstrings of a stdlib package, in a stable order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = stdlib / package
    files = sorted(root.rglob("*.py")) if root.is_dir() else [stdlib / f"{package}.py"]
    texts = []
    for path in files:
        if not path.is_file() or "test" in path.relative_to(stdlib).parts[1:]:  # test suites are a different kind of text
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= MIN_CHARS:
                    texts.append(text)
    return texts


def build_rows(packages: tuple[str, ...] = PACKAGES, max_per_class: int | None = None) -> list[tuple[str, str]]:
    rows = []
    for package in packages:
        texts = docstrings(package)
        rows.extend((text, package) for text in texts[:max_per_class])
    return rows


def write_csv(path: str | Path, rows: list[tuple[str, str]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)  # QUOTE_MINIMAL: values with newlines, quotes or commas get quoted
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="CSV file to write")
    parser.add_argument("--max-per-class", type=int, default=None, help="cap rows per package")
    args = parser.parse_args()
    rows = build_rows(max_per_class=args.max_per_class)
    write_csv(args.output, rows)
    counts = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    print(f"{len(rows)} rows -> {args.output}: {counts}")


if __name__ == "__main__":
    main()
