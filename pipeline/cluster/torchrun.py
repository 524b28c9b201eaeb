"""The torchrun command line of a training run, on one node or on many."""

from __future__ import annotations

import sys

from pipeline.config import TrainConfig

WORKER = "pipeline.train"
"""The module torchrun runs (`-m`): the recipe. Its imports are part of the train stage's code version."""


def rendezvous_id(train: TrainConfig, fingerprint: str) -> str:
    return train.rdzv_id or f"tunepipe-{fingerprint[:16]}"


def torchrun_args(train: TrainConfig, *, rdzv_endpoint: str | None = None, rdzv_id: str = "tunepipe") -> list[str]:
    """torchrun's own options. One node without an endpoint: `--standalone` (a rendezvous on a
    free local port). Otherwise a c10d rendezvous at `rdzv_endpoint` that every node joins."""
    if train.nnodes == 1 and rdzv_endpoint is None:
        return ["--standalone", f"--nproc-per-node={train.nproc_per_node}"]
    return [
        f"--nnodes={train.nnodes}", f"--nproc-per-node={train.nproc_per_node}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
    ]


def torchrun_command(train: TrainConfig, worker_args: list[str], *, python: str = sys.executable,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "tunepipe") -> list[str]:
    return [python, "-m", "torch.distributed.run", *torchrun_args(train, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id),
            "-m", WORKER, *worker_args]
