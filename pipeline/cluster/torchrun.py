"""The command line of a training run: torchrun on one node or on many, or one process alone."""

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


def local_command(train: TrainConfig, worker_args: list[str], *, python: str = sys.executable) -> list[str]:
    """This machine's run: torchrun for several processes; `python -m pipeline.train` for one.

    A world of one has no process group to form, and torchrun would only add its own start-up
    (importing torch and its elastic agent: ~3 s of every single-process run, measured 12.4 s
    against 9.2 s to a worker's first line on a busy 2-core machine). The recipe runs alone
    exactly as under torchrun with one process (parallel/dist.py: world size 1, no group), and a
    stop signal reaches it directly instead of through torchrun (train/preemption.py)."""
    if train.world_size == 1:
        return [python, "-m", WORKER, *worker_args]
    return torchrun_command(train, worker_args, python=python)
