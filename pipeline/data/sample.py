"""Sample: drop duplicates, pick the rows to train on (seeded), hold out validation and test rows.

    tunepipe stage sample examples/quickstart.yaml --set sample.dedup=minhash --set sample.test_fraction=0.1

Reads the ingest output's `shards/*.parquet` (sorted names are the row order) and writes
`train.parquet`, `validation.parquet` and `test.parquet`: always all three, with the shards'
columns, possibly with no rows.

Memory stays bounded by a batch of rows plus a few bytes per row: pass 1 reads only the key
columns (dedup columns, `stratify_by`, `group_by`) batch by batch and keeps a dedup verdict, a
class code and a group hash per row; the selection is then made on global row indices; pass 2
streams every column again and writes the chosen rows. Deciding on global indices is also why the
same seed gives the same rows whatever `data.shard_rows` was.

Rows keep their input order within each split: no shuffle here, because the trainer shuffles the
packed blocks with a seeded permutation anyway, and in-order output keeps this stage streaming.

- Dedup runs first: `exact` keeps the first row of each normalised text (NFKC, casefold, whitespace
  collapsed; see data/dedup.py); `minhash` also drops near-duplicates of an earlier kept row.
  Compared columns: `dedup_columns`, by default the columns the task reads (present in the shards).
- `stratify_by`: the sample holds each class in proportion (largest remainder, within one row per
  class), and each split holds the sample's class proportions: a class of q sampled rows gets
  within one row of q x (split rows / sampled rows) in every split, train included. Null and empty
  labels form one class, "".
- `group_by`: whole groups, in a seeded order, fill validation and then test until each reaches
  its row target (the last group may overshoot it); the other groups train. With `stratify_by`
  too, the sample is stratified but the split follows the groups: no group spans two splits, and
  the per-split class counts (in the stats) are only as even as the groups allow. Null and empty
  keys form one group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import ConfigError, RowSpec, SampleConfig
from pipeline.data.dedup import Deduplicator, row_texts, text_hashes

SPLITS = ("train", "validation", "test")
BATCH_ROWS = 8192
# Rows gathered per split before a write, so the outputs get row groups of a useful size even
# when a split takes only a few rows from each batch.
WRITE_ROWS = 16384


# ---------------------------------------------------------------- columns


@dataclass(frozen=True)
class KeyColumns:
    dedup: list[str]
    classes: str | None  # stratify_by, or the label of a classification task (for the stats)
    group: str | None


def shard_paths(folder: Path) -> list[Path]:
    shards = sorted((folder / "shards").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no shards/*.parquet (is this an ingest output?)")
    return shards


def shard_schema(shards: list[Path]) -> pa.Schema:
    schema = pq.ParquetFile(shards[0]).schema_arrow
    for path in shards[1:]:
        if pq.ParquetFile(path).schema_arrow.names != schema.names:
            raise ValueError(f"{path.name} has columns {pq.ParquetFile(path).schema_arrow.names}, {shards[0].name} has {schema.names}")
    return schema


def key_columns(cfg: SampleConfig, spec: RowSpec, available: list[str]) -> KeyColumns:
    """The columns pass 1 reads. A wrong name fails here, before anything is written."""

    def check(key: str, column: str) -> str:
        if column not in available:
            raise ConfigError(f"sample.{key}: column {column!r} not in the ingest output; it has {available}")
        return column

    dedup: list[str] = []
    if cfg.dedup_columns is not None:
        dedup = [check("dedup_columns", c) for c in cfg.dedup_columns]
    elif cfg.dedup != "none":
        # Optional columns (the instruction template's input) count when present: two rows with
        # the same instruction and output but different inputs are different examples.
        dedup = [check("dedup_columns (default: the task's columns)", c) for c in spec.required_columns]
        dedup += [c for c in spec.columns.values() if c in available and c not in dedup]
    classes = check("stratify_by", cfg.stratify_by) if cfg.stratify_by else None
    if classes is None and spec.task == "classification" and spec.columns.get("label") in available:
        classes = spec.columns["label"]
    group = check("group_by", cfg.group_by) if cfg.group_by else None
    return KeyColumns(dedup if cfg.dedup != "none" else [], classes, group)


def read_batches(shards: list[Path], columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    """Every row in order, a batch at a time; `columns=None` reads them all."""
    for path in shards:
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)


# ---------------------------------------------------------------- pass 1: per-row keys


@dataclass
class RowKeys:
    rows: int
    keep: np.ndarray  # bool per row: survives dedup
    duplicates_removed: int
    near_duplicates_removed: int
    class_names: list[str]  # sorted; empty without a class column
    class_codes: np.ndarray | None  # int64 per row, indexes class_names
    group_ids: np.ndarray | None  # int64 per row; ids follow the sorted group-key hashes


class ClassCodes:
    """Labels -> small integer codes, batch by batch; null and "" are the same class."""

    def __init__(self) -> None:
        self.code_of: dict[str, int] = {}
        self.codes: list[np.ndarray] = []

    def add(self, column: pa.Array) -> None:
        encoded = pc.dictionary_encode(pc.fill_null(column, ""))
        codes = [self.code_of.setdefault(v, len(self.code_of)) for v in encoded.dictionary.to_pylist()]
        self.codes.append(np.array(codes, np.int64)[encoded.indices.to_numpy(zero_copy_only=False)])

    def finish(self) -> tuple[list[str], np.ndarray]:
        """Codes renumbered in sorted label order, so they do not depend on which label came first."""
        names = sorted(self.code_of)
        rank = np.empty(len(names), np.int64)
        rank[[self.code_of[n] for n in names]] = np.arange(len(names))
        return names, rank[np.concatenate(self.codes)] if self.codes else np.zeros(0, np.int64)


def group_hashes(column: pa.Array) -> np.ndarray:
    """64-bit hash of each row's group key. Two keys colliding would only put their groups together."""
    encoded = pc.dictionary_encode(pc.fill_null(column, ""))
    return text_hashes(encoded.dictionary.to_pylist())[encoded.indices.to_numpy(zero_copy_only=False)]


def read_keys(cfg: SampleConfig, shards: list[Path], columns: KeyColumns) -> RowKeys:
    wanted = list(dict.fromkeys([*columns.dedup, *filter(None, [columns.classes, columns.group])]))
    dedup = Deduplicator(cfg.dedup, cfg.minhash_threshold, cfg.minhash_num_perm, cfg.seed) if columns.dedup else None
    classes = ClassCodes() if columns.classes else None
    groups: list[np.ndarray] = []
    rows = 0
    for batch in read_batches(shards, wanted):
        rows += batch.num_rows
        if dedup is not None:
            dedup.add(row_texts([batch.column(c).to_pylist() for c in columns.dedup]))
        if classes is not None:
            classes.add(batch.column(columns.classes))
        if columns.group:
            groups.append(group_hashes(batch.column(columns.group)))

    keep, duplicates, near = dedup.finish() if dedup is not None else (np.ones(rows, bool), 0, 0)
    names, codes = classes.finish() if classes is not None else ([], None)
    group_ids = np.unique(np.concatenate(groups), return_inverse=True)[1] if groups else None
    return RowKeys(rows, keep, duplicates, near, names, codes, group_ids)


# ---------------------------------------------------------------- selection


def rows_to_keep(cfg: SampleConfig, n: int) -> int:
    if cfg.count is not None:
        # More rows asked for than exist keeps them all: stats["rows_in"] shows how many there were.
        return min(cfg.count, n)
    if cfg.fraction is not None:
        return max(1, round(cfg.fraction * n)) if n else 0
    return n


def _held_out(fraction: float, kept: int, room: int) -> int:
    if fraction == 0 or room < 1:
        return 0
    # At least one row, so evaluation has something to score; never more than leaves train a row.
    return min(max(1, round(fraction * kept)), room)


def split_sizes(cfg: SampleConfig, kept: int) -> dict[str, int]:
    validation = _held_out(cfg.validation_fraction, kept, kept - 1)
    test = _held_out(cfg.test_fraction, kept, kept - 1 - validation)
    return {"train": kept - validation - test, "validation": validation, "test": test}


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, each within one of total x weight / sum(weights)."""
    weight_sum = int(weights.sum())
    if weight_sum == 0:
        return np.zeros(len(weights), np.int64)
    share, remainder = np.divmod(total * weights.astype(np.int64), weight_sum)
    extra = total - int(share.sum())
    # Ties go to the earlier (alphabetically smaller) class, so the result is deterministic.
    share[np.lexsort((np.arange(len(weights)), -remainder))[:extra]] += 1
    return share


def apportion_splits(class_rows: np.ndarray, split_rows: list[int]) -> np.ndarray:
    """[classes, splits] integers with row sums `class_rows` and column sums `split_rows`, each
    entry within one of class_rows x split_rows / total (a "controlled rounding").

    Such a rounding always exists (the fractional table is a point of a transportation polytope,
    whose vertices are integral) but rounding each split on its own can miss it, e.g. leave train
    two rows short for a class. Start from the floors; the rows still missing are placed by a max
    flow: class -> split (one extra row at most, and only where the exact share is fractional) ->
    split total. Classes with the same needs are pooled, so the flow graph has a few nodes
    however many classes there are.
    """
    total = int(class_rows.sum())
    table, remainder = np.divmod(np.outer(class_rows.astype(np.int64), split_rows), max(total, 1))
    class_missing = class_rows - table.sum(axis=1)
    split_missing = np.asarray(split_rows) - table.sum(axis=0)
    fractional = remainder > 0
    pools: dict[tuple, list[int]] = {}
    for c in np.flatnonzero(class_missing):
        pools.setdefault((int(class_missing[c]), *map(bool, fractional[c])), []).append(int(c))
    pool_keys = list(pools)
    n_pools, n_splits = len(pool_keys), len(split_rows)
    # Nodes: 0 source, 1..n_pools pools, then the splits, then the sink.
    sink = 1 + n_pools + n_splits
    capacity = np.zeros((sink + 1, sink + 1), np.int64)
    for p, key in enumerate(pool_keys, start=1):
        members = len(pools[key])
        capacity[0, p] = key[0] * members
        for s in range(n_splits):
            capacity[p, 1 + n_pools + s] = members if key[1 + s] else 0
    capacity[1 + n_pools : sink, sink] = split_missing
    flow = _max_flow(capacity, 0, sink)
    for p, key in enumerate(pool_keys, start=1):
        members = pools[key]
        # Deal the pool's extra rows out: split s's slots are consecutive and at most one per
        # member, so taking every len(members)-th slot never gives a member the same split twice.
        slots = np.repeat(np.arange(n_splits), flow[p, 1 + n_pools : sink])
        for i, c in enumerate(members):
            table[c, slots[i :: len(members)]] += 1
    if not (table.sum(axis=0) == split_rows).all():
        raise AssertionError(f"split apportionment failed for {class_rows} into {split_rows}")
    return table


def _max_flow(capacity: np.ndarray, source: int, sink: int) -> np.ndarray:
    """Edmonds-Karp on a dense capacity matrix; returns the flow on each edge."""
    flow = np.zeros_like(capacity)
    while True:
        parent = {source: source}
        queue = [source]
        while queue and sink not in parent:
            u = queue.pop(0)
            for v in np.flatnonzero(capacity[u] - flow[u] > 0):
                if int(v) not in parent:
                    parent[int(v)] = u
                    queue.append(int(v))
        if sink not in parent:
            return flow
        path, v = [], sink
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(capacity[u, v] - flow[u, v] for u, v in path)
        for u, v in path:
            flow[u, v] += push
            flow[v, u] -= push


def choose_rows(cfg: SampleConfig, keys: RowKeys, rng: np.random.Generator) -> list[np.ndarray]:
    """The sampled rows of each stratum (one stratum without `stratify_by`), in seeded random order."""
    candidates = np.flatnonzero(keys.keep)
    strata = keys.class_codes[candidates] if cfg.stratify_by else np.zeros(len(candidates), np.int64)
    n_strata = len(keys.class_names) if cfg.stratify_by else 1
    by_stratum = np.argsort(strata, kind="stable")
    counts = np.bincount(strata, minlength=n_strata)
    quotas = largest_remainder(counts, rows_to_keep(cfg, len(candidates)))
    members = np.split(candidates[by_stratum], np.cumsum(counts)[:-1])
    return [rows[rng.permutation(len(rows))[:quota]] for rows, quota in zip(members, quotas)]


def split_by_class(chosen: list[np.ndarray], sizes: dict[str, int]) -> dict[str, np.ndarray]:
    table = apportion_splits(np.array([len(c) for c in chosen]), [sizes[s] for s in SPLITS])
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for rows, counts in zip(chosen, table):
        # Rows are in seeded random order: validation takes the first, then test, train the rest.
        ends = np.cumsum([counts[1], counts[2]])
        parts["validation"].append(rows[: ends[0]])
        parts["test"].append(rows[ends[0] : ends[1]])
        parts["train"].append(rows[ends[1] :])
    return {s: np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for s, p in parts.items()}


def split_by_group(rows: np.ndarray, group_ids: np.ndarray, sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    groups, group_of_row, group_rows = np.unique(group_ids[rows], return_inverse=True, return_counts=True)
    split_of_group = np.zeros(len(groups), np.int64)  # 0 train, 1 validation, 2 test
    unassigned = len(rows)
    order = iter(rng.permutation(len(groups)))
    for code, split in ((1, "validation"), (2, "test")):
        filled = 0
        while filled < sizes[split]:
            g = next(order, None)
            if g is None:
                break
            if unassigned - group_rows[g] < 1:
                continue  # this group would leave train empty: it trains
            split_of_group[g] = code
            filled += group_rows[g]
            unassigned -= group_rows[g]
    split_of_row = split_of_group[group_of_row]
    return {s: np.sort(rows[split_of_row == code]) for code, s in enumerate(SPLITS)}


def select(cfg: SampleConfig, keys: RowKeys) -> dict[str, np.ndarray]:
    """Global row indices of each split, ascending."""
    rng = np.random.default_rng(cfg.seed)
    chosen = choose_rows(cfg, keys, rng)
    sizes = split_sizes(cfg, sum(len(c) for c in chosen))
    if keys.group_ids is None:
        return split_by_class(chosen, sizes)
    return split_by_group(np.concatenate(chosen), keys.group_ids, sizes, rng)


# ---------------------------------------------------------------- pass 2: write


def write_splits(shards: list[Path], schema: pa.Schema, splits: dict[str, np.ndarray], out: Path) -> None:
    writers = {s: pq.ParquetWriter(out / f"{s}.parquet", schema) for s in SPLITS}
    pending: dict[str, list[pa.RecordBatch]] = {s: [] for s in SPLITS}

    def flush(split: str) -> None:
        if pending[split]:
            writers[split].write_table(pa.Table.from_batches(pending[split], schema))
            pending[split] = []

    try:
        start = 0
        for batch in read_batches(shards, None):
            end = start + batch.num_rows
            for split, rows in splits.items():
                lo, hi = np.searchsorted(rows, [start, end])
                if hi > lo:
                    pending[split].append(batch.take(pa.array(rows[lo:hi] - start)))
                if sum(b.num_rows for b in pending[split]) >= WRITE_ROWS:
                    flush(split)
            start = end
        for split in SPLITS:
            flush(split)
    finally:
        for writer in writers.values():
            writer.close()


# ---------------------------------------------------------------- stats and entry point


def split_stats(splits: dict[str, np.ndarray], keys: RowKeys) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    present = np.bincount(keys.class_codes[keys.keep], minlength=len(keys.class_names)) if keys.class_codes is not None else None
    for split, rows in splits.items():
        stats[split] = {"rows": len(rows)}
        if present is not None:
            counts = np.bincount(keys.class_codes[rows], minlength=len(keys.class_names))
            stats[split]["classes"] = {n: int(counts[i]) for i, n in enumerate(keys.class_names) if present[i]}
        if keys.group_ids is not None:
            stats[split]["groups"] = len(np.unique(keys.group_ids[rows]))
    return stats


def run(cfg: SampleConfig, spec: RowSpec, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict[str, Any]:
    shards = shard_paths(Path(inputs["ingest"]))
    schema = shard_schema(shards)
    columns = key_columns(cfg, spec, schema.names)
    keys = read_keys(cfg, shards, columns)
    splits = select(cfg, keys)
    write_splits(shards, schema, splits, out)

    rows_out = sum(len(r) for r in splits.values())
    stats: dict[str, Any] = {
        "rows_in": keys.rows,
        "duplicates_removed": keys.duplicates_removed,
        "near_duplicates_removed": keys.near_duplicates_removed,
        "rows_not_sampled": int(keys.keep.sum()) - rows_out,
        "rows_out": rows_out,
        "splits": split_stats(splits, keys),
    }
    if keys.class_codes is not None:
        counts = np.bincount(keys.class_codes[keys.keep], minlength=len(keys.class_names))
        stats["classes"] = {n: int(counts[i]) for i, n in enumerate(keys.class_names) if counts[i]}
    return stats
