"""What a training run shows while it runs and when it ends: TensorBoard scalars, a progress bar
with ETA (rank 0, on a terminal), log lines, and a one-screen summary table.

MFU (model FLOPs utilisation, GPU only) follows the PaLM paper's appendix B:
    flops per token = 6 N + 12 L T d     (N parameters in matmuls: all but the input embeddings, with the
                                          output head even when tied to them; L layers, T sequence length, d width)
    MFU = flops per token x tokens/s / peak dense bf16 FLOP/s of the device
The 6N term is forward + backward through the weights; 12 L T d is the attention scores and
values, which 6N leaves out. Trainable-only methods (LoRA, ...) still pay the full forward and
most of the backward, so N counts every parameter; the estimate is therefore slightly high for them.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

from pipeline.config import TrainConfig

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
    # An embedding lookup is no matmul, but an output head is one even when it shares the token
    # embedding's weight (GPT-2): count it, as nanoGPT and llm.c do (a third of GPT-2 small's FLOPs).
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    tied = weight is not None and any(isinstance(m, torch.nn.Embedding) and m.weight is weight for m in model.modules())
    return 6 * (params - embedding + (weight.numel() if tied else 0)) + 12 * layers * seq_len * width


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated on a GPU; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class Monitor:
    """What a run shows: log lines, TensorBoard scalars, a progress bar, the closing summary.

    Rank 0 writes; the other ranks get a Monitor that does nothing, so callers never branch. The
    logged rate covers the steps since the last log line (a window), the ETA the whole run so far.
    """

    def __init__(self, output: Path, is_main: bool, cfg: TrainConfig, start_step: int, flops_token: float, peak_total: float | None):
        self.is_main, self.cfg = is_main, cfg
        self.flops_token, self.peak_total = flops_token, peak_total
        self.start_step = start_step
        self.t0 = self.window_start = time.perf_counter()
        self.window_tokens = 0
        self.writer = None
        self.bar = None
        if not is_main:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, drop events a killed run wrote past its last checkpoint.
            self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_step + 1)
        # A bar only on a terminal (the CLI sets TUNEPIPE_PROGRESS when its own stdout is one);
        # piped into a log file, \r-redrawn bars are noise, and the periodic log lines carry the ETA.
        if os.environ.get("TUNEPIPE_PROGRESS") == "1" or sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def start(self, task: str, info, global_batch: int, block_size: int, train_rows: int, trainable: int, total: int) -> None:
        cfg = self.cfg
        self.log(
            f"task {task}, method {cfg.method}, strategy {cfg.strategy}"
            + (f" ({cfg.deepspeed_config})" if cfg.strategy == "deepspeed" else "")
            + f"; world size {info.world_size} (backend {info.backend or 'none'}, device {info.device})"
        )
        self.log(
            f"global batch = {cfg.micro_batch_size} micro x {cfg.grad_accum_steps} accum x {info.world_size} ranks "
            f"= {global_batch} rows of up to {block_size} tokens; {train_rows} train rows"
        )
        self.log(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
        if cfg.compile:
            self.log("torch.compile on: the first step waits for the compiler (about 45 s on 2 CPU cores, seconds from its cache)")

    def advance(self) -> None:
        """One more step trained (its numbers come later, with `step`)."""
        if self.is_main and self.bar is not None:
            self.bar.update(1)

    def step(self, done: int, loss: float, lr: float, grad_norm: float, real_tokens: int) -> None:
        """Step `done`'s numbers, read from the device every log_every_steps (step.settle)."""
        now = time.perf_counter()
        self.window_tokens += real_tokens
        rate = self.window_tokens / (now - self.window_start)
        mfu = self.flops_token * rate / self.peak_total if self.peak_total else None
        if self.is_main and self.writer is not None:
            scalars = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate, "mfu": mfu}
            for name, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(f"train/{name}", value, done)
        if self.is_main and self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if done % self.cfg.log_every_steps == 0 or done == self.cfg.max_steps:
            eta = (self.cfg.max_steps - done) * (now - self.t0) / max(1, done - self.start_step)
            self.log(
                f"step {done}/{self.cfg.max_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                f"tok/s {rate:,.0f}" + (f" mfu {mfu:.1%}" if mfu else "") + f" eta {eta:.0f}s"
            )
            self.window_start, self.window_tokens = now, 0

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if self.is_main and self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"validation/{name}", value, step)
        self.log(f"validation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def early_stop(self, state) -> None:
        self.log(
            f"early stopping at step {state.stopped_at}: {self.cfg.early_stopping_metric} has not improved for "
            f"{state.bad} validations (best {state.best:.4f} at step {state.best_step})"
        )

    def summary(self, stats: dict, state, memory: list[float]) -> None:
        cfg, start = self.cfg, stats["resumed_from_step"]
        rows = [
            ("task / method / strategy", f"{stats['task']} / {cfg.method} / {cfg.strategy}"),
            ("world size, global batch", f"{stats['world_size']}, {stats['global_batch_rows']} rows"),
            ("trainable parameters", f"{stats['trainable_params']:,} of {stats['total_params']:,} "
                                     f"({100 * stats['trainable_params'] / stats['total_params']:.2f}%)"),
            ("steps this run", f"{stats['steps'] - start} (from {start} to {stats['steps']})"),
            ("real tokens, tokens/s", f"{stats['tokens_this_run']:,}, {stats['tokens_per_s'] or 0:,.0f}"),
            ("final train loss", f"{stats['final_loss']:.4f}" if state.history else "-"),
            ("peak memory per rank", ", ".join(human_bytes(m) for m in memory)),
        ]
        if state.evals:
            rows.append(("last validation", ", ".join(f"{k} {v:.4f}" for k, v in state.evals[-1].items() if k != "step")))
        if state.stopped_at:
            rows.append(("early stopping", f"at step {state.stopped_at} (best at {state.best_step})"))
        self.log(summary_table(rows))

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
