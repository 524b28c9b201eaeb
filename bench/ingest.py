"""Ingest throughput and memory against raw pyarrow and Hugging Face `datasets`, on one text-heavy CSV.

    python bench/ingest.py                 # ~300 MB CSV, cached under /tmp/tunepipe-bench
    python bench/ingest.py --mb 2000 --repeat 1

Each method runs in its own subprocess, so peak RSS (ru_maxrss) is that method's alone; time is the
work only, after imports. Methods, each writing Parquet from the same CSV:

    ours      pipeline.ingest.run with the default data config
    pyarrow   pyarrow.csv.open_csv (newlines_in_values=True, else defaults) + pq.ParquetWriter, batch by batch
    datasets  datasets.load_dataset("csv", data_files=..., cache_dir=<temp>, keep_in_memory=False) + .to_parquet

Prints a table, then as the very last line one JSON object for ours:
{"mb_per_s", "vs_pyarrow", "vs_datasets", "peak_rss_mb"} (vs_*: our MB/s over theirs, medians of --repeat runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running this file puts bench/ first on sys.path, where a sibling script named like a stdlib
# module (bench/tokenize.py) would shadow it for everything imported after this line.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import csv
import importlib
import io
import json
import os
import random
import resource
import statistics
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ours", "pyarrow", "datasets")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


# ---------------------------------------------------------------- the input


def _vocabulary(rng: random.Random) -> list[str]:
    words = ["".join(rng.choices(_ALPHABET, k=rng.randint(1, 11))) for _ in range(20_000)]
    # Commas, quotes and non-ASCII text: what makes CSV quoting and UTF-8 checks do real work.
    return words + ["the", "a", "of", "and", "to", "is", "it,", 'said "yes"', "don't", "café", "naïve", "✓", "1,000"]


def _row(rng: random.Random, words: list[str]) -> tuple[str, str]:
    prompt = " ".join(rng.choices(words, k=rng.randint(8, 90)))
    paragraphs = [" ".join(rng.choices(words, k=rng.randint(15, 160))) for _ in range(rng.randint(1, 4))]
    # Half the responses span lines: quoted values with line breaks, as model answers do.
    response = "\n\n".join(paragraphs) if rng.random() < 0.5 else " ".join(paragraphs)
    return prompt, response


def generate(path: Path, mb: int, seed: int = 0) -> None:
    """A CSV of about `mb` MB (prompt, response); written to a temp name first, so an interrupted
    run never leaves a truncated file that a later run would take as the cached input."""
    rng = random.Random(seed)
    words = _vocabulary(rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    written, target = 0, mb * 1_000_000
    with partial.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerow(["prompt", "response"])
        while written < target:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(_row(rng, words) for _ in range(2000))
            chunk = buffer.getvalue()
            f.write(chunk)
            written += len(chunk.encode())
    partial.rename(path)


# ---------------------------------------------------------------- the methods (run in a child)


def run_ours(path: Path, work: Path):
    from pipeline.data import ingest
    from pipeline.config import build_config

    cfg = build_config({"data": {"source": str(path)}})
    out = work / "out"
    out.mkdir()
    start = time.perf_counter()
    stats = ingest.run(cfg.data, cfg.row_spec, inputs={}, out=out, scratch=work / "scratch")
    return stats["rows_out"], time.perf_counter() - start


def run_pyarrow(path: Path, work: Path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    start = time.perf_counter()
    reader = pacsv.open_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    rows = 0
    with pq.ParquetWriter(work / "out.parquet", reader.schema) as writer:
        for batch in reader:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows, time.perf_counter() - start


def run_datasets(path: Path, work: Path):
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    dataset = datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=str(work / "cache"),
                                    keep_in_memory=False)
    dataset.to_parquet(str(work / "out.parquet"))
    return len(dataset), time.perf_counter() - start


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


# Imported before the clock starts: `datasets` alone takes seconds to import.
_IMPORTS = {"ours": ["pipeline.data.ingest", "pipeline.config"], "pyarrow": ["pyarrow.csv", "pyarrow.parquet"],
            "datasets": ["datasets"]}


def child(method: str, path: Path) -> None:
    for name in _IMPORTS[method]:
        importlib.import_module(name)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f"bench-{method}-") as work:
        cpu = _cpu_seconds()
        rows, seconds = globals()[f"run_{method}"](path, Path(work))
        cpu = _cpu_seconds() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rows": rows, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak}))


def measure(method: str, path: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-P", __file__, "--child", method, "--path", str(path)],  # -P: see the top
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if done.returncode:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="size of the generated CSV in MB")
    parser.add_argument("--path", type=Path, help="CSV to use (generated there when missing)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method, interleaved; medians reported")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.path or Path(tempfile.gettempdir()) / "tunepipe-bench" / f"ingest-{args.mb}mb.csv"
    if args.child:
        return child(args.child, path)
    if not path.exists():
        print(f"generating {path} ({args.mb} MB) ...", flush=True)
        generate(path, args.mb)
    size_mb = path.stat().st_size / 1e6
    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeat):
        for method in methods:
            runs[method].append(measure(method, path))

    summary = {}
    print(f"\n{path}: {size_mb:.0f} MB, {os.cpu_count()} CPUs, median of {args.repeat} run(s)")
    # CPU seconds (all threads) are a second view of the cost: unlike wall time, other load on
    # the machine barely moves them.
    print(f"{'method':<10} {'seconds':>8} {'MB/s':>8} {'CPU s':>7} {'peak RSS MB':>12} {'rows':>10}   all runs (s)")
    for method, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        cpu = statistics.median(r["cpu_seconds"] for r in results)
        rss = max(r["peak_rss_mb"] for r in results)
        summary[method] = {"mb_per_s": size_mb / seconds, "peak_rss_mb": rss}
        every = ", ".join(f"{r['seconds']:.2f}" for r in results)
        print(f"{method:<10} {seconds:8.2f} {size_mb / seconds:8.1f} {cpu:7.2f} {rss:12.0f} {results[0]['rows']:>10}   {every}")
    ours = summary.get("ours")
    if ours is None:
        return
    ratio = lambda other: round(ours["mb_per_s"] / summary[other]["mb_per_s"], 3) if other in summary else None
    print(json.dumps({"mb_per_s": round(ours["mb_per_s"], 1), "vs_pyarrow": ratio("pyarrow"),
                      "vs_datasets": ratio("datasets"), "peak_rss_mb": round(ours["peak_rss_mb"])}))


if __name__ == "__main__":
    main()
