"""DDP behind the `Replica` interface (replica.py): the model and its optimizer on every rank."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.train.parallel.dist import DistInfo
from pipeline.train.parallel.optim import build_optimizer, set_lr
from pipeline.train.tensor_files import load_tensors, save_tensors


class DDPReplica:
    """The model, its optimizer and (fp16 on CUDA) its loss scaler, replicated on every rank."""

    def __init__(self, model: torch.nn.Module, param_groups: list[dict], cfg: TrainConfig, info: DistInfo):
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
        self.optimizer = build_optimizer(param_groups, cfg)
        self.trainable = [p for g in param_groups for p in g["params"]]
        # fp16 overflows where bf16 does not: scale the loss up, unscale before clipping, and skip
        # the steps whose gradients overflowed (GradScaler's dynamic loss scaling).
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.handles_overflow = self.scaler is not None
        self.skips_on_device = True

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

    def step(self, lr_multiplier: float, loss: torch.Tensor | None = None) -> torch.Tensor:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        set_lr(self.optimizer, lr_multiplier)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips overflowed steps itself (and waits for the GPU to know)
            self.scaler.update()
        else:
            # The fused AdamW leaves weights, moments and its step count untouched where found_inf
            # is nonzero, decided on the device: a NaN step changes nothing and the host never
            # waits to find out (the trainer reports it at the next log line and stops unsaved).
            bad = ~torch.isfinite(grad_norm if loss is None else grad_norm + loss.to(grad_norm.device))
            self.optimizer.found_inf = bad.to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        # Under DDP, zero the grads in place: they stay views into the all-reduce buckets. Freed
        # (None) grads would be allocated afresh beside the buckets on every no_sync micro-step,
        # 4 more bytes per parameter at the peak (bench/zero_memory.py measures it).
        self.optimizer.zero_grad(set_to_none=self.wrapped is self.module)
        return grad_norm

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        # Frozen weights come back from the base model; saving them would make a LoRA
        # checkpoint as big as the model.
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    def save(self, folder: Path) -> None:
        if self.info.is_main:  # replicas are identical: one copy is enough
            state = {"model": self._trainable_state(), "optimizer": self.optimizer.state_dict()}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            save_tensors(state, Path(folder) / "replica.pt")

    def load(self, folder: Path) -> None:
        state = load_tensors(Path(folder) / "replica.pt", map_location=self.info.device)
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
