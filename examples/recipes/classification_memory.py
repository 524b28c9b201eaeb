"""Intent classification two ways, side by side: GPT-2 frozen as a feature extractor (the head
alone trains, classification_frozen.yaml) and every weight trained (classification_full.yaml).
What each keeps in memory for training, what it measured, and what it scores on held-out rows.

    tunepipe run examples/recipes/base.yaml                     # once: the base both start from (~3 minutes)
    python examples/recipes/classification_memory.py            # both recipes, one table (~2 minutes on 2 CPU cores)
    python examples/recipes/classification_memory.py --set train.max_steps=50 --workdir /tmp/runs

Both run through evaluate, in process (pipeline.stages.run_stages), sharing the cached data stages;
neither publishes (`tunepipe run examples/recipes/classification_frozen.yaml` does). `--set
KEY=VALUE` goes to both; `--registry` is where recipe-base was published.

The arithmetic is per rank under train.strategy ddp (each rank holds all of it; ZeRO shards the
gradients and optimizer state instead), for fp32 weights: bf16 autocast on a GPU changes the
activations, not these tensors. Activations are not in it at all; the measured peak has them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.stages import run_stages

RECIPES = Path(__file__).resolve().parent
METHODS = {"frozen": RECIPES / "classification_frozen.yaml", "full": RECIPES / "classification_full.yaml"}
"""Column name -> the recipe it runs."""

FP32_BYTES = 4
# torch.optim.AdamW keeps two fp32 tensors the shape of each trainable parameter, exp_avg and
# exp_avg_sq (Adam's first and second moments, m and v): 8 bytes per trainable parameter. Its per-tensor
# `step` counter is a scalar (4 bytes per parameter tensor, not per parameter), left out.
ADAMW_STATE_BYTES = 2 * FP32_BYTES
MIB = 1024 * 1024


def arithmetic(trainable: int, total: int) -> dict:
    """Bytes training holds besides activations: every weight, a gradient and the AdamW state for
    each trainable one. A frozen weight (requires_grad False) gets neither: torch never allocates
    its .grad, and the optimizer is built over the trainable parameters only."""
    weights = FP32_BYTES * total
    gradients = FP32_BYTES * trainable
    optimizer = ADAMW_STATE_BYTES * trainable
    return {"weight_bytes": weights, "gradient_bytes": gradients, "optimizer_bytes": optimizer,
            "static_bytes": weights + gradients + optimizer}


def measure_one(config: Path, overrides: list[str], workdir: str, log=print) -> dict:
    """Run one recipe through evaluate; its arithmetic, measurements and held-out scores."""
    cfg = load_config(config, overrides)
    results = {r.name: r for r in run_stages(cfg, workdir, until="evaluate", log=log)}
    trained = results["train"].artifact.local_path()
    train = json.loads((trained / "train_stats.json").read_text())
    metrics = json.loads((results["evaluate"].artifact.local_path() / "metrics.json").read_text())
    return {
        "method": train["method"],
        "trainable_params": train["trainable_params"],
        "total_params": train["total_params"],
        **arithmetic(train["trainable_params"], train["total_params"]),
        "peak_memory_bytes": train["peak_memory_bytes"],  # one per rank
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "split": metrics["split"],
        "train_seconds": train["seconds"],
        "train_output": str(trained),
    }


def measure(overrides: list[str] = (), registry: str = "registry", workdir: str = "runs", log=print) -> dict[str, dict]:
    """{"frozen": ..., "full": ...}: `measure_one` of each recipe, with the same overrides."""
    overrides = [f"registry.url={registry}", *overrides]  # an explicit --set registry.url wins
    return {name: measure_one(config, overrides, workdir, log) for name, config in METHODS.items()}


def _mib(n: float) -> str:
    return f"{n / MIB:,.2f} MiB"


def table(measured: dict[str, dict]) -> str:
    """One row per quantity, one column per method; then the optimizer-state ratio."""
    m = list(measured.values())
    rows = [
        ("trainable parameters", [f"{x['trainable_params']:,}" for x in m]),
        ("total parameters", [f"{x['total_params']:,}" for x in m]),
        ("gradient bytes (4 x trainable)", [f"{x['gradient_bytes']:,}" for x in m]),
        ("AdamW state bytes (8 x trainable)", [f"{x['optimizer_bytes']:,}" for x in m]),
        ("weights + gradients + AdamW state", [_mib(x["static_bytes"]) for x in m]),
        ("measured peak memory of training", [", ".join(_mib(b) for b in x["peak_memory_bytes"]) for x in m]),
        ("held-out accuracy", [f"{x['accuracy']:.4f} ({x['split']})" for x in m]),
        ("held-out macro F1", [f"{x['macro_f1']:.4f} ({x['split']})" for x in m]),
        ("train seconds", [f"{x['train_seconds']:.1f}" for x in m]),
    ]
    header = ("", list(measured))
    width = max(len(label) for label, _ in [header, *rows])
    columns = [max(len(row[1][i]) for row in [header, *rows]) for i in range(len(m))]
    lines = [" | ".join([label.ljust(width), *(v.rjust(w) for v, w in zip(values, columns))]) for label, values in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def optimizer_ratio(measured: dict[str, dict]) -> float:
    return measured["full"]["optimizer_bytes"] / measured["frozen"]["optimizer_bytes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both recipes, e.g. train.max_steps=50")
    p.add_argument("--registry", default="registry", help="registry holding recipe-base (sets registry.url)")
    p.add_argument("--workdir", default="runs", help="the pipeline's workdir (stage outputs, cache)")
    args = p.parse_args(argv)
    measured = measure(args.set, args.registry, args.workdir)
    print(table(measured))
    print(f"AdamW state, full / frozen: {optimizer_ratio(measured):,.0f}x")
    print("Measured peak: on a GPU, the most memory torch allocated on it; on CPU, the training "
          "process's peak resident set (the Python interpreter and torch's libraries included).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
