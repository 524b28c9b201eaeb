"""The process group: join what torchrun described, and the few collectives the recipe needs."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def die_with_launcher() -> None:
    """Under torchrun, end this worker when its launcher (torchrun's agent) dies, even by SIGKILL.

    torchrun starts each worker in a session of its own, so a kill -9 of the run's process group
    reaches torchrun but not the workers: they trained on, writing checkpoints beside the rerun,
    for 10-15 s in one probe. The launcher's own death signal comes from train/stage.py."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher or launcher == 1:  # it died before the signal was armed
        os._exit(1)


def init_distributed() -> DistInfo:
    """Join the process group torchrun described (or run alone when started without torchrun)."""
    die_with_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
        # TF32 for what autocast leaves in fp32 (the loss, fp32 runs): ~8x the fp32 matmul rate on Ampere+.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size == 1:
        return DistInfo(0, 0, 1, None, device)
    if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "lower train.nproc_per_node"
        )
    # Long timeout: the first collective waits for every rank to finish loading the model.
    # On GPUs, host tensors (a step's target counts, the stop vote) go over gloo beside NCCL: an
    # all-reduce of them then never waits for the GPU's queued work, as a NCCL one would.
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if backend == "nccl" else backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, local_rank, world_size, backend, device)


def all_gather_floats(values: list[float], info: DistInfo) -> list[list[float]]:
    """Every rank's `values` (same length on each), on every rank: for per-rank summaries."""
    mine = torch.tensor(values, dtype=torch.float64)
    if not info.is_distributed:
        return [mine.tolist()]
    out = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    if info.is_distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on at least one: how the ranks agree to stop together."""
    if not info.is_distributed:
        return flag
    return all_reduce_sum(torch.tensor([1.0 if flag else 0.0]), info).item() > 0


def from_main(value: int, info: DistInfo) -> int:
    """Rank 0's `value` on every rank (a small integer, e.g. the checkpoint step all ranks load)."""
    if not info.is_distributed:
        return value
    mine = torch.tensor([float(value) if info.is_main else 0.0], dtype=torch.float64)
    return int(all_reduce_sum(mine, info).item())
