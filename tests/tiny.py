"""A pipeline small enough for tests: the bundled support data, cut down, and a 2-layer GPT-2.

Shared by the end-to-end tests; every value is an ordinary `--set` override.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def tiny_overrides(registry: Path, **extra) -> list[str]:
    values = {
        "data.source": str(REPO / "examples" / "data" / "support.csv"),
        "sample.count": 240,
        "sample.validation_fraction": 0.1,
        "tokenize.block_size": 32,
        "tokenize.vocab_size": 300,
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.n_embd": 32,
        "train.max_steps": 40,
        "train.warmup_steps": 4,
        "train.micro_batch_size": 4,
        "train.save_every_steps": 5,
        "train.log_every_steps": 5,
        "evaluate.num_generations": 1,
        "evaluate.max_new_tokens": 8,
        "evaluate.max_perplexity": None,
        "registry.url": str(registry),
        "registry.model_name": "tiny",
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def cli_args(command: str, workdir: Path, registry: Path, *stage: str, **extra) -> list[str]:
    args = [command, *stage, str(QUICKSTART), "--workdir", str(workdir)]
    for override in tiny_overrides(registry, **extra):
        args += ["--set", override]
    return args


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def published_weights(registry: Path) -> Path:
    found = sorted(Path(registry).glob("tiny/*/model/model.safetensors"))
    assert len(found) == 1, found
    return found[0]
