"""What the recipe trains through: one `Replica` interface, and `wrap_model`, the only place it is chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager, Protocol

import torch

from pipeline.config import TrainConfig
from pipeline.train.parallel.dist import DistInfo


class Replica(Protocol):
    """A model with its optimizer, replicated or sharded across the ranks (ddp.py, zero.py).

    The recipe calls, per step: for each micro-batch `with micro_step(last): forward(...);
    backward(loss, last)`, then `step(lr_multiplier)`. The loss handed to backward is already this
    rank's share of the global mean, so every implementation yields the same update.
    """

    module: torch.nn.Module
    """The model itself (unwrapped): for eval mode and for saving."""
    handles_overflow: bool
    """fp16 loss scaling skips a step whose gradients overflowed: its non-finite grad norm is no error."""
    skips_on_device: bool
    """`step` skips the update itself, on the device, when the loss or gradient norm is not finite, and
    returns the norm as a device tensor: the trainer reads both later, without waiting for the GPU."""

    def forward(self, **batch: Any) -> Any: ...

    def micro_step(self, last: bool) -> ContextManager:
        """Context around one micro-batch's forward and backward (DDP skips the all-reduce unless `last`)."""

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None: ...

    def step(self, lr_multiplier: float, loss: torch.Tensor | None = None) -> "float | torch.Tensor":
        """Clip, set each group's lr to initial_lr x multiplier, update, zero grads; the pre-clip grad norm.
        `loss` is the step's global mean loss (a device tensor)."""

    def save(self, folder: Path) -> None:
        """Collective: this rank's part of model and optimizer state into `folder`."""

    def load(self, folder: Path) -> None: ...

    def full_state_dict(self) -> dict | None:
        """Collective: the whole model's state on rank 0 (fp32 master weights under DeepSpeed), None elsewhere."""


def wrap_model(model: torch.nn.Module, param_groups: list[dict], cfg: TrainConfig, info: DistInfo) -> Replica:
    """`train.strategy` ddp or deepspeed. DeepSpeed is imported only when chosen."""
    if cfg.strategy == "deepspeed":
        from pipeline.train.parallel.zero import deepspeed_replica

        return deepspeed_replica(model, param_groups, cfg, info)
    from pipeline.train.parallel.ddp import DDPReplica

    return DDPReplica(model, param_groups, cfg, info)
