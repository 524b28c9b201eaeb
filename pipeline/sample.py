"""Sample: pick the rows to train on (seeded) and hold some out for validation.

Reads the ingest shards, writes `train.parquet` and `validation.parquet` with the same columns.
Rows come out in a seeded random order. The same seed gives the same rows whatever
`data.shard_rows` was, because selection indexes the rows in their input order, not per shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SampleConfig


def read_shards(folder: Path) -> pa.Table:
    shards = sorted((folder / "shards").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no shards/*.parquet (is this an ingest output?)")
    return pa.concat_tables(pq.read_table(p) for p in shards)


def rows_to_keep(cfg: SampleConfig, n: int) -> int:
    if cfg.count is not None:
        # More rows asked for than exist keeps them all: stats["rows_in"] shows how many there were.
        return min(cfg.count, n)
    if cfg.fraction is not None:
        return max(1, round(cfg.fraction * n)) if n else 0
    return n


def validation_size(cfg: SampleConfig, kept: int) -> int:
    if cfg.validation_fraction == 0 or kept < 2:
        return 0
    # At least one row, so evaluation has something to score; at least one left to train on.
    return min(max(1, round(cfg.validation_fraction * kept)), kept - 1)


def run(cfg: SampleConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict[str, Any]:
    table = read_shards(Path(inputs["ingest"]))
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(table.num_rows)[: rows_to_keep(cfg, table.num_rows)]
    n_validation = validation_size(cfg, len(order))
    validation, train = table.take(order[:n_validation]), table.take(order[n_validation:])
    pq.write_table(train, out / "train.parquet")
    pq.write_table(validation, out / "validation.parquet")
    return {"rows_in": table.num_rows, "train": train.num_rows, "validation": validation.num_rows}
