"""What a training run shows while it runs and when it ends: TensorBoard scalars, a progress bar
with ETA (rank 0, on a terminal), log lines, and a one-screen summary table.

MFU (model FLOPs utilisation, GPU only) follows the PaLM paper's appendix B:
    flops per token = 6 N + 12 L T d     (N non-embedding parameters, L layers, T sequence length, d width)
    MFU = flops per token x tokens/s / peak dense bf16 FLOP/s of the device
The 6N term is forward + backward through the weights; 12 L T d is the attention scores and
values, which 6N leaves out. Trainable-only methods (LoRA, ...) still pay the full forward and
most of the backward, so N counts every parameter; the estimate is therefore slightly high for them.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

# Peak dense bf16 tensor-core FLOP/s from the vendors' datasheets (SXM parts, no sparsity).
_PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 0
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 0
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return 6 * (params - embedding) + 12 * layers * seq_len * width


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated on a GPU; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class Monitor:
    """Rank 0 writes; the other ranks get a Monitor that does nothing, so callers never branch."""

    def __init__(self, output: Path, is_main: bool, total_steps: int, start_step: int, tensorboard: bool):
        self.is_main = is_main
        self.writer = None
        self.bar = None
        if not is_main:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, drop events a killed run wrote past its last checkpoint.
            self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_step + 1)
        # A bar only on a terminal (the CLI sets TUNEPIPE_PROGRESS when its own stdout is one);
        # piped into a log file, \r-redrawn bars are noise, and the periodic log lines carry the ETA.
        if os.environ.get("TUNEPIPE_PROGRESS") == "1" or sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def step(self, step: int, scalars: dict[str, float | None]) -> None:
        if not self.is_main:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(f"train/{name}", value, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.is_main and self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"validation/{name}", value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])
