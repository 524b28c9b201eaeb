"""Which float type the forward pass runs in: one policy for training, validation and the reference stage."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipeline.config import TrainConfig


def autocast_for(precision: str, device: torch.device):
    """`train.precision` as an autocast context: `auto` is bf16 on a CUDA device that supports it, fp32 elsewhere."""
    if device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cuda" and precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def autocast_context(cfg: TrainConfig, device: torch.device):
    if cfg.strategy == "deepspeed":
        return nullcontext()  # the engine runs the module in bf16/fp16 itself (deepspeed_configs/)
    return autocast_for(cfg.precision, device)
