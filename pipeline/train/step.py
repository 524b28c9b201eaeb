"""One optimizer step of the recipe (train/recipe.py), the reading of its numbers, and a validation.

    result = train_step(run, state, checkpoints)      # queues the step's work; waits for nothing
    rows = settle(run, pending, checkpoints)          # every log_every_steps: one read for all pending steps

On a GPU the host runs ahead of the device: it prepares the next batch and queues its kernels while
the device computes, and reads the loss only when a log line, a validation or a checkpoint needs it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.config import PipelineConfig
from pipeline.data.loader import held_out_batches, micro_batch_ids, sample_ids
from pipeline.train import objectives
from pipeline.train.methods import Method
from pipeline.train.parallel.dist import DistInfo, all_reduce_sum
from pipeline.train.parallel.replica import Replica
from pipeline.train.precision import autocast_context
from pipeline.train.state import TrainState


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: PipelineConfig
    info: DistInfo
    task: str
    method: Method
    model_meta: dict
    train_rows: object
    validation_rows: object | None
    replica: Replica
    only_targets: objectives.TargetPositionsOnly | None
    trainable: int
    total: int
    flops_token: float
    lengths: bytes | None
    """Row lengths as int64 bytes when batches group by length: the data order's cache key, made once."""
    schedule: Callable[[int], float]
    """Step -> learning-rate multiplier (warmup, then cosine)."""

    @property
    def model_task(self) -> str:
        """What the model is: preference tuning trains a causal LM."""
        return "causal_lm" if self.task == "preference" else self.task

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum_steps * self.info.world_size


class NonFiniteLoss(RuntimeError):
    pass


NON_FINITE_ADVICE = "Lower train.lr, raise train.warmup_steps or train.max_grad_norm, or use fp32/bf16 instead of fp16."


def step_seed(seed: int, step: int, rank: int) -> int:
    # Dropout noise is a pure function of (seed, step, rank): a resumed run draws exactly what
    # the uninterrupted run drew, even if some RNG consumer outside this loop changes.
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63)


@dataclass
class StepResult:
    numbers: torch.Tensor
    """[loss, grad norm(, rewards/chosen, rejected, margins, accuracies)] of the global step, float64 on
    the device: read together with the other steps' every log_every_steps (`settle`), not here, so the
    host never waits for the GPU inside the loop."""
    lr: float
    real_tokens: int
    """Tokens of the global batch that are not padding (throughput counts these)."""
    targets: int
    """What the global step's loss is a mean over (target_count): tokens, examples or pairs."""
    samples: list[int]
    """Global sample indices this rank trained on."""


def train_step(run: Run, state: TrainState, checkpoints) -> StepResult:
    """One optimizer step on the next global batch of the stream; the caller advances `state`.

    Nothing here waits for the device: the batch's shape, target counts and target positions come
    from the host-side labels, copies are non-blocking, the loss stays a device tensor, and a
    non-finite loss or gradient skips the update on the device (the fused AdamW's `found_inf`);
    `settle` reads the numbers and stops the run there."""
    tcfg, info, task, rows, replica = run.cfg.train, run.info, run.task, run.train_rows, run.replica
    torch.manual_seed(step_seed(tcfg.seed, state.step, info.rank))
    micro_batches, local_real, local_targets, my_samples = [], 0, 0, []
    for m in range(tcfg.grad_accum_steps):
        start, count = micro_batch_ids(state.samples_seen, m, tcfg.micro_batch_size, info.rank, info.world_size)
        ids = sample_ids(start, count, len(rows), tcfg.seed, run.lengths)
        batch = rows.batch(ids)
        micro_batches.append(batch)
        local_real += rows.real_tokens(ids)
        local_targets += objectives.target_count(batch["labels"], task)
        my_samples.extend(range(start, start + count))
    # Normalise by the targets of the whole global step, so every token (or example) weighs the
    # same whatever the accumulation, world size or prompt masking.
    # A host tensor: its all-reduce goes over gloo even beside NCCL (parallel/dist.py).
    counts = all_reduce_sum(torch.tensor([local_targets, local_real], dtype=torch.int64), info)
    global_targets, global_real = counts[0].item(), int(counts[1].item())
    scale = info.world_size / max(1.0, global_targets)  # data parallelism averages gradients over ranks

    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    reward_sums = torch.zeros(3, dtype=torch.float64, device=info.device)
    for m, host_batch in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        batch = objectives.split_batch(host_batch, task, info.device)
        with replica.micro_step(last):
            selecting = run.only_targets.selecting(batch.targets) if run.only_targets else nullcontext()
            with autocast_context(tcfg, info.device), selecting:
                target_loss, sums = objectives.batch_loss(replica.forward(**batch.inputs).logits, batch, task, tcfg.dpo_beta, run.only_targets)
            replica.backward(target_loss * scale, last)
        if sums is not None:
            reward_sums += sums
        loss_sum += target_loss.detach().double()
    loss = all_reduce_sum(loss_sum, info) / max(1.0, global_targets)
    if not replica.skips_on_device:
        # DeepSpeed reads its gradient norm on the host anyway: check the loss before its step.
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"step {state.step + 1}: loss is {value}; stopped before the optimizer step. "
                                f"Newest complete checkpoint: {checkpoints.newest()} (untouched). {NON_FINITE_ADVICE}")
    multiplier = run.schedule(state.step)
    grad_norm = replica.step(multiplier, loss)
    numbers = [loss, torch.as_tensor(grad_norm, dtype=torch.float64).to(info.device)]
    if task == "preference":
        numbers.append(all_reduce_sum(reward_sums, info))
    return StepResult(torch.cat([n.reshape(-1).double() for n in numbers]), tcfg.lr * multiplier, global_real, global_targets, my_samples)


def settle(run: Run, pending: list[tuple[int, StepResult]], checkpoints) -> list[dict]:
    """The log rows of the steps in `pending`, read from the device in one transfer (the loop's only
    wait for the GPU between log lines). A non-finite loss or gradient norm stops the run here,
    naming the first such step: its update (and any later non-finite one) was skipped on the device,
    and no checkpoint has been written since."""
    if not pending:
        return []
    values = torch.stack([result.numbers for _, result in pending]).cpu().tolist()
    rows = []
    for (step, result), numbers in zip(pending, values):
        loss, grad_norm, *rewards = numbers
        bad = ("loss", loss) if not math.isfinite(loss) else \
            ("gradient norm", grad_norm) if not math.isfinite(grad_norm) and not run.replica.handles_overflow else None
        if bad:
            # Only now: listing the checkpoints is I/O (on S3 a request), too slow for every settled step.
            raise NonFiniteLoss(f"step {step}: {bad[0]} is {bad[1]}; its update was skipped and the run stopped at step "
                                f"{pending[-1][0]} before saving. Newest complete checkpoint: {checkpoints.newest()} "
                                f"(untouched). {NON_FINITE_ADVICE}")
        extras = objectives.reward_metrics(rewards, result.targets) if rewards else {}
        rows.append({"step": step, "loss": loss, "lr": result.lr, "grad_norm": grad_norm, **extras})
    pending.clear()
    return rows


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Mean loss (and accuracy) over up to `eval_batches` validation batches (data.loader.held_out_batches).

    Every rank scores the same batches: no collective is needed for DDP, and ZeRO-3, whose
    forward gathers parameters from all ranks, gets the same number of forwards on each."""
    tcfg, device, task, rows = run.cfg.train, run.info.device, run.task, run.validation_rows
    run.replica.module.eval()
    loss, targets, correct = torch.zeros((), dtype=torch.float64, device=device), 0, 0
    reward_sums = torch.zeros(3, dtype=torch.float64, device=device)
    for ids in held_out_batches(len(rows), tcfg.micro_batch_size, tcfg.eval_batches):
        batch = objectives.split_batch(rows.batch(ids), task, device)
        # Classification's accuracy needs every logit; the LM head runs on target positions only.
        selecting = run.only_targets.selecting(batch.targets) if run.only_targets else nullcontext()
        with autocast_context(tcfg, device), selecting:
            output = run.replica.forward(**batch.inputs).logits
            batch_loss, sums = objectives.batch_loss(output, batch, task, tcfg.dpo_beta, run.only_targets)
        loss += batch_loss.double()
        if sums is not None:
            reward_sums += sums
        targets += batch.count
        correct += objectives.correct_count(output, batch.labels, task) or 0
    run.replica.module.train()
    metrics = {"eval_loss": loss.item() / max(1, targets)}
    if task == "preference":
        metrics.update({f"eval_{k}": v for k, v in objectives.reward_metrics(reward_sums, targets).items()})
    if task == "classification":
        metrics["accuracy"] = correct / max(1, targets)
    return metrics


