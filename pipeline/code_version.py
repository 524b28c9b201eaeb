"""The code a stage runs, found from the code itself: no list kept by hand, so none can drift.

A stage's code version hashes the source of every project module in the import closure of its
module, and the data files those modules name (the stop-word list beside normalize.py). The
closure follows every `import` and `from ... import` of a `pipeline` module anywhere in a file
(inside functions too: a lazy import is still code the stage runs), the packages whose
`__init__.py` each import executes, and string constants that name a project module exactly:
that is how a stage launches code in another process (`torchrun -m pipeline.train` runs
`pipeline/train/__main__.py`). Over-inclusion costs a recompute; a missed module would serve a
stale cache, so every doubt resolves towards including.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "pipeline"
ROOT = Path(__file__).resolve().parent.parent
"""The folder holding the `pipeline` package (the repository, or site-packages when installed)."""


def module_file(name: str) -> Path | None:
    """The source file of project module `name` (a package's `__init__.py`), or None if it is no module."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=1024)
def _scan(path: Path, stamp: tuple[int, int]) -> tuple[frozenset[str], frozenset[str]]:
    """(module names a file refers to, string constants in it). Cached by (mtime, size): a rerun
    of the fingerprint after a stage ran re-reads only files that changed."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = _package_of(path)
    names: set[str] = set()
    strings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 256:
            strings.add(node.value)
    return frozenset(names), frozenset(strings)


def _package_of(path: Path) -> str:
    """The package a file's relative imports start from (`pipeline/config/data.py` -> `pipeline.config`)."""
    return ".".join(path.relative_to(ROOT).parts[:-1])


def _absolute(module: str | None, level: int, package: str) -> str:
    if not level:
        return module or ""
    parts = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def _scan_file(path: Path):
    stat = path.stat()
    return _scan(path, (stat.st_mtime_ns, stat.st_size))


def _is_project(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def closure(entry: str) -> dict[str, Path]:
    """Every project module `entry` can run, by name -> source file."""
    found: dict[str, Path] = {}
    queue = [entry]
    while queue:
        name = queue.pop()
        if name in found or not _is_project(name):
            continue
        path = module_file(name)
        if path is None:
            continue  # `from pipeline.config import TrainConfig`: a name, not a module
        found[name] = path
        parts = name.split(".")
        queue.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages' __init__ run first
        names, strings = _scan_file(path)
        queue.extend(n for n in names if _is_project(n))
        for text in strings:
            if _is_project(text) and module_file(text):
                queue.append(text)
                queue.append(text + ".__main__")  # `-m package` runs its __main__.py
    return found


def data_files(modules: dict[str, Path]) -> dict[str, Path]:
    """Non-Python files that a module names by a string beside itself (`Path(__file__).with_name("stopwords_en.txt")`)."""
    found = {}
    for path in modules.values():
        _, strings = _scan_file(path)
        for text in strings:
            if "/" in text or "\\" in text or text.endswith(".py") or not text.strip():
                continue
            candidate = path.parent / text
            if candidate.is_file():
                found[candidate.relative_to(ROOT).as_posix()] = candidate
    return found


def code_version(entry: str) -> str:
    """sha256 over the names and bytes of every module in `entry`'s closure and the data files they name."""
    modules = closure(entry)
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode() + b"\0" + modules[name].read_bytes() + b"\0")
    for name, path in sorted(data_files(modules).items()):
        digest.update(b"data:" + name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
