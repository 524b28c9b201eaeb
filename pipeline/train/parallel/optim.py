"""The one optimizer and learning-rate schedule, for every replica (DDP and DeepSpeed alike)."""

from __future__ import annotations

import math

import torch

from pipeline.config import TrainConfig


def build_optimizer(param_groups: list[dict], cfg: TrainConfig, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the method's parameter groups (each with its own lr and weight decay).

    `fused`: one kernel over all parameters (CUDA and CPU); on CPU the default is a Python loop
    over tensors, ~5% of a small model's step. DeepSpeed shards and steps the optimizer itself
    and takes the plain one. Each group keeps `initial_lr`: the replica scales it every step
    by `lr_multiplier`, as torch's LambdaLR would.
    """
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


def lr_multiplier(cfg: TrainConfig):
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return f


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
