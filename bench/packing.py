"""Packing utilisation on a realistic SFT length distribution: how much of what the trainer feeds is real tokens.

    .venv/bin/python -m bench.packing              # 100k examples, block 2048

Example lengths are lognormal (median 150 tokens, sigma 1.0: most are short, a long tail reaches
the block), seeded, truncated at the block size. Utilisation = real tokens / token slots fed:

  none        one example per row, each batch of 8 (random order) right-padded to its longest
  concat      all examples joined and cut into blocks (only the last block pads)
  bins        first-fit-decreasing into blocks (pipeline.packing.pack_bins), whole examples
  max_length  every example padded to the block (`padding="max_length"`)

The last line printed is one JSON object {"bins", "concat", "none", "max_length"} (0-1).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # keep this folder off sys.path: bench/tokenize.py would shadow the stdlib
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from pipeline.data.packing import Ragged, first_fit_decreasing, offsets_of, pack_bins  # noqa: E402


def sft_lengths(n: int, block: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(150), 1.0, n).astype(np.int64), 8, block)


def dynamic_padding(lengths: np.ndarray, batch: int, seed: int = 0) -> float:
    shuffled = np.random.default_rng(seed).permutation(lengths)
    pad = len(shuffled) % batch
    full = shuffled[: len(shuffled) - pad].reshape(-1, batch)
    slots = int(full.max(axis=1).sum()) * batch + (int(shuffled[-pad:].max()) * pad if pad else 0)
    return int(lengths.sum()) / slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    lengths = sft_lengths(args.examples, args.block)
    tokens = int(lengths.sum())
    ids = np.ones(tokens, np.int32)
    examples = Ragged(ids, ids, offsets_of(lengths))
    t0 = time.perf_counter()
    first_fit_decreasing(lengths, args.block)
    t1 = time.perf_counter()
    packed, _, _ = pack_bins(examples, args.block, pad_id=0)
    t2 = time.perf_counter()

    result = {
        "bins": tokens / packed.size,
        "concat": tokens / (-(-tokens // args.block) * args.block),
        "none": dynamic_padding(lengths, args.batch),
        "max_length": tokens / (len(lengths) * args.block),
    }
    rows = {"bins": len(packed), "concat": -(-tokens // args.block), "none": len(lengths), "max_length": len(lengths)}
    print(f"{args.examples:,} examples, {tokens:,} tokens; lengths median {int(np.median(lengths))}, "
          f"mean {lengths.mean():.0f}, p99 {int(np.percentile(lengths, 99))}, at the block {int((lengths == args.block).sum())}")
    print(f"bins: first-fit-decreasing {t1 - t0:.2f}s; pack_bins (placement + writing ids, labels, positions) {t2 - t1:.2f}s")
    print(f"{'layout':<12}{'rows':>10}{'utilisation':>13}")
    for name, value in result.items():
        print(f"{name:<12}{rows[name]:>10,}{value:>13.4f}")
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()
