"""What a reader yields (`Chunk`s of string columns) and what it sets aside (`Reject`s)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

Reject = tuple[int, str, Any]
"""(line, reason, raw): raw is the record's text, or its values when only those are known."""

BOM = b"\xef\xbb\xbf"


class BlockTooSmall(Exception):
    """A CSV record is larger than the reader's block (pyarrow's "straddling object"): read the
    file again with a larger one."""

    def __init__(self, line: int | None = None):
        super().__init__(line)
        self.line = line


@dataclass
class Chunk:
    table: pa.Table
    """String columns, named after data.rename; the reader's own rejects are already gone."""
    lines: Callable[[], np.ndarray]
    """The start line of each row of `table`; computed only when a row is rejected later."""
    rejects: list[Reject] = field(default_factory=list)
    position: int = 0
    """Bytes of the source consumed so far, for the progress bar."""
    utf8_replaced: int = 0
    blank_lines: int = 0
    ignored: set[str] = field(default_factory=set)
    """JSONL keys outside the columns (which the first objects' keys decided): not written."""


@dataclass
class Cursor:
    """Where a reader is, so that an error it cannot skip past can name the line."""

    line: int | None = None


def tell(raw) -> int:
    try:
        return raw.tell()
    except (OSError, ValueError):  # io.UnsupportedOperation: some decompressors cannot tell
        return 0
