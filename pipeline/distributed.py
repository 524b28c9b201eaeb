"""Everything that knows about ranks and process groups. Nothing else in tunepipe does.

`init_distributed()` reads the environment `torchrun` sets; `wrap_model()` is the only place a
data-parallel wrapper is chosen (DDP here, DeepSpeed ZeRO in `deepspeed_engine.py`). Model, data
and method code never ask for the rank or the world size.
"""

from __future__ import annotations

import os
from pathlib import Path
from contextlib import nullcontext
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


def init_distributed() -> DistInfo:
    """Join the process group torchrun described (or run alone when started without torchrun)."""
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
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(rank, local_rank, world_size, backend, device)


class DDPReplica:
    """The model, its optimizer and (fp16 on CUDA) its loss scaler, replicated on every rank.

    The trainer talks only to this interface (`pipeline.deepspeed_engine.DeepSpeedReplica` is the
    other implementation): forward, backward, step, save/load of this rank's state, full weights.
    """

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], cfg, info: DistInfo):
        # A 4-bit (QLoRA) base is placed on the GPU by from_pretrained and refuses `.to()`.
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False)
        self.module, self.info, self.max_grad_norm = model if quantized else model.to(info.device), info, cfg.max_grad_norm
        self.wrapped = model
        if info.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [info.local_rank] if info.device.type == "cuda" else None
            # gradient_as_bucket_view: grads become views into the all-reduce buckets, saving one
            # gradient copy per rank (with the in-place zero_grad in step(); bench/zero_memory.py).
            self.wrapped = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
        # fused: one kernel over all parameters (CUDA and CPU); on CPU the default is a Python
        # loop over tensors, ~5% of a small model's step.
        self.optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.95), eps=1e-8, fused=True)
        self.trainable = [p for g in param_groups for p in g["params"]]
        # fp16 overflows where bf16 does not: scale the loss up, unscale before clipping, and skip
        # the steps whose gradients overflowed (GradScaler's dynamic loss scaling).
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    def forward(self, **batch):
        return self.wrapped(**batch)

    def micro_step(self, last: bool):
        """Skip DDP's gradient all-reduce on accumulation micro-steps that are not the last.

        DDP reads the flag in forward, so this context must cover forward and backward."""
        if last or not hasattr(self.wrapped, "no_sync"):
            return nullcontext()
        return self.wrapped.no_sync()

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, lr_multiplier: float) -> float:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        # Under DDP, zero the grads in place: they stay views into the all-reduce buckets. Freed
        # (None) grads would be allocated afresh beside the buckets on every no_sync micro-step,
        # 4 more bytes per parameter at the peak (bench/zero_memory.py measures it).
        self.optimizer.zero_grad(set_to_none=self.wrapped is self.module)
        return float(grad_norm)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        # Frozen weights come back from the base model; saving them would make a LoRA
        # checkpoint as big as the model.
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def save(self, folder: Path) -> None:
        if self.info.is_main:  # replicas are identical: one copy is enough
            state = {"model": self._trainable_state(), "optimizer": self.optimizer.state_dict()}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, Path(folder) / "replica.pt")

    def load(self, folder: Path) -> None:
        state = torch.load(Path(folder) / "replica.pt", map_location=self.info.device, weights_only=False)
        missing, unexpected = self.module.load_state_dict(state["model"], strict=False)
        still_missing = [n for n, p in self.module.named_parameters() if p.requires_grad and n in missing]
        if still_missing or unexpected:
            raise RuntimeError(
                f"checkpoint {folder} does not fit this model (missing trainable {still_missing[:3]}, "
                f"unexpected {unexpected[:3]}): was train.method or the model changed?"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict | None:
        return self.module.state_dict() if self.info.is_main else None


def wrap_model(model: torch.nn.Module, param_groups: list[dict], cfg, info: DistInfo):
    """The only place a data-parallel wrapper is chosen: `train.strategy` ddp or deepspeed."""
    if cfg.strategy == "deepspeed":
        from pipeline.deepspeed_engine import deepspeed_replica

        return deepspeed_replica(model, param_groups, cfg, info)
    return DDPReplica(model, param_groups, cfg, info)


def micro_step(replica, last: bool):
    """The replica's accumulation context (DeepSpeed tracks accumulation boundaries itself)."""
    return replica.micro_step(last) if hasattr(replica, "micro_step") else nullcontext()


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
