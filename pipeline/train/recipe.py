"""Fine-tune a model on the pre-tokenized rows of a committed tokenize output.

One recipe, read top to bottom: `setup` -> a loop over `train_step` (with `validate` and a
checkpoint every N steps) -> `save_model`. It never tokenizes: it memory-maps what the tokenize
stage committed (data/loader.py picks the layout from meta.json, which also names the task). Run
it alone or under torchrun; the pipeline's train stage (train/stage.py) launches it exactly so:

    torchrun --standalone --nproc_per_node 2 -m pipeline.train \
        --tokenized runs/tokenize/<fingerprint> --config examples/quickstart.yaml \
        --output /tmp/model-out --checkpoints /tmp/ckpt [--set train.lr=3e-4]

On several nodes, run on each (HOST:PORT is node 0's address; docs/clusters.md):

    torchrun --nnodes N --nproc_per_node G --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
        --rdzv_id RUN -m pipeline.train --tokenized ... --commit-output (same arguments on every node)

Rerunning the same command resumes from the newest complete checkpoint in --checkpoints, at the
same sample of the data stream, even with a different number of processes (DDP). SIGUSR1 or
SIGTERM (a cluster's preemption or time-limit warning) stops every rank at the next step
boundary with a checkpoint (train/preemption.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.config import PipelineConfig, TrainConfig, load_config
from pipeline.data.loader import held_out_batches, micro_batch_ids, open_split, sample_ids
from pipeline.train import cpu_dropout, objectives
from pipeline.train.checkpoint import checkpoint_world_size, load_checkpoint
from pipeline.train.checkpoint_stores import open_checkpoints
from pipeline.train.job_output import JobOutput, local_input
from pipeline.train.methods import Method, method_for, save_trained, unwrap
from pipeline.train.modeling import build_model, count_parameters
from pipeline.train.host import keep_freed_memory_for_reuse
from pipeline.train.observe import Monitor, flops_per_token, peak_flops, peak_memory_bytes
from pipeline.train.parallel.dist import DistInfo, all_gather_floats, all_reduce_sum, barrier, cleanup, init_distributed
from pipeline.train.parallel.optim import lr_multiplier
from pipeline.train.parallel.replica import Replica, wrap_model
from pipeline.train.preemption import STOPPED_EXIT_CODE, StopRequests, announce_stop
from pipeline.train.state import TrainState


class NonFiniteLoss(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenized", required=True, help="committed tokenize output folder (has meta.json, train/, tokenizer/)")
    p.add_argument("--config", help="pipeline YAML/JSON; its model and train sections are used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    p.add_argument("--output", required=True, help="folder (or, with --commit-output, URL) for the final model, tokenizer and train log")
    p.add_argument("--commit-output", action="store_true", help="write OUTPUT as a committed folder (manifest with sha256s, written last) for the train stage to adopt: cluster jobs")
    p.add_argument("--checkpoints", required=True, help="folder every rank sees, or a URL (s3://...), for resumable checkpoints")
    p.add_argument("--reference", help="task preference: the reference stage's output (the reference model's log-probabilities of every pair)")
    p.add_argument("--log-samples", action="store_true", help="write the global sample indices each rank trains on to OUTPUT/samples/rank<R>.jsonl")
    return p.parse_args(argv)


def autocast_context(cfg: TrainConfig, device: torch.device):
    if cfg.strategy == "deepspeed":
        return nullcontext()  # the engine runs the module in bf16/fp16 itself (deepspeed_configs/)
    if device.type == "cuda" and cfg.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cuda" and cfg.precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu" and cfg.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def step_seed(seed: int, step: int, rank: int) -> int:
    # Dropout noise is a pure function of (seed, step, rank): a resumed run draws exactly what
    # the uninterrupted run drew, even if some RNG consumer outside this loop changes.
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63)


# ---------------------------------------------------------------- setup


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


def setup(cfg: PipelineConfig, tokenized: Path, info: DistInfo, reference: Path | None = None) -> Run:
    train_rows = open_split(tokenized / "train", reference)
    # `epochs` and `eval_every: epoch` become steps here, where the rows are known; the run's
    # config is the resolved one from now on (the loop, the schedule, the progress bar).
    cfg = cfg.model_copy(update={"train": cfg.train.for_rows(len(train_rows), info.world_size)})
    tcfg = cfg.train
    meta = json.loads((tokenized / "meta.json").read_text())
    task = meta.get("task", "causal_lm")
    model_task = "causal_lm" if task == "preference" else task
    if task == "preference" and reference is None:
        raise ValueError("task preference needs the reference model's log-probabilities: pass --reference (the reference stage's output)")
    method = method_for(tcfg)
    method.check(tcfg, None, info.device.type)
    validation_rows = None
    if tcfg.eval_every_steps and (tokenized / "validation").is_dir():
        validation_rows = open_split(tokenized / "validation", reference)
        validation_rows = validation_rows if len(validation_rows) else None
    # A soft prompt occupies positions too: a scratch model gets room for it in front of the block.
    model_meta = dict(meta, block_size=meta["block_size"] + method.extra_positions(tcfg))

    model = build_model(cfg.model, model_task, model_meta, tcfg.seed, method.load_kwargs(tcfg))
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if model_task == "causal_lm" and positions and positions < model_meta["block_size"]:
        # Else an IndexError deep inside the embedding lookup at the first step.
        raise ValueError(f"tokenize.block_size {meta['block_size']} + {method.extra_positions(tcfg)} virtual tokens needs "
                         f"{model_meta['block_size']} positions, but the model has {positions}: lower tokenize.block_size "
                         f"to {positions - method.extra_positions(tcfg)}")
    if tcfg.gradient_checkpointing:
        # Non-reentrant: works when the inputs need no grad (frozen embeddings, LoRA).
        # (transformers 5.23 renamed gradient_checkpointing_enable; older 5.x only has the old name.)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = method.apply(model, tcfg, model_task, tokenized / "tokenizer")
    if task == "preference":
        # As TRL does: without dropout the policy's first log-probabilities are the reference's
        # (the loss starts at ln 2), and the log-ratios measure the weights, not the noise.
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    elif tcfg.fast_cpu_dropout and info.device.type == "cpu":
        cpu_dropout.install(model)
    model.train()
    trainable, total = count_parameters(model)
    flops_token = flops_per_token(model, train_rows.block_size)
    # Causal LM: the output head runs only where a target follows (not on prompts and padding);
    # not where a method puts positions of its own in front.
    head = unwrap(model).get_output_embeddings() if model_task == "causal_lm" and not method.extra_positions(tcfg) else None
    only_targets = objectives.TargetPositionsOnly(head) if head is not None else None
    replica = wrap_model(model, method.parameter_groups(model, tcfg), tcfg, info)
    # Rows padded per batch can be grouped by length (less padding; a bias in the batches).
    lengths = getattr(train_rows, "lengths", None) if tcfg.group_by_length else None
    lengths = None if lengths is None else np.ascontiguousarray(lengths, dtype=np.int64).tobytes()
    return Run(cfg, info, task, method, model_meta, train_rows, validation_rows, replica, only_targets,
               trainable, total, flops_token, lengths, lr_multiplier(tcfg))


def resume(run: Run, checkpoints) -> TrainState:
    """The state of the newest complete checkpoint (model and optimizer restored into the replica), or a fresh one.
    Rank 0 chooses it and every rank loads that one (checkpoint_stores.py)."""
    folder = checkpoints.choose(run.info, log=print if run.info.is_main else lambda _: None)
    if folder is None:
        return TrainState()
    state = TrainState.from_dict(load_checkpoint(folder, run.replica, run.info))
    before = checkpoint_world_size(folder)
    changed = f"; world size {before} -> {run.info.world_size}" if before != run.info.world_size else ""
    if run.info.is_main:
        print(f"resuming from {folder} (step {state.step}, sample {state.samples_seen}{changed})", flush=True)
    return state


# ---------------------------------------------------------------- one step


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    real_tokens: int
    """Tokens of the global batch that are not padding (throughput counts these)."""
    samples: list[int]
    """Global sample indices this rank trained on."""
    extras: dict[str, float]
    """Task metrics of the step for the log (preference: rewards/chosen, rejected, margins, accuracies)."""


def train_step(run: Run, state: TrainState, checkpoints) -> StepResult:
    """One optimizer step on the next global batch of the stream; the caller advances `state`."""
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
    # same whatever the accumulation, world size or prompt masking. float64: counts stay exact.
    counts = all_reduce_sum(torch.tensor([local_targets, local_real], dtype=torch.float64), info)
    global_targets, global_real = counts[0].item(), int(counts[1].item())
    scale = info.world_size / max(1.0, global_targets)  # data parallelism averages gradients over ranks

    loss_sum = torch.zeros((), dtype=torch.float64)
    reward_sums = torch.zeros(3, dtype=torch.float64)
    for m, batch in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        reference = batch.pop("reference_logps", None)
        inputs, labels = objectives.model_inputs({k: v.to(info.device) for k, v in batch.items()}, task)
        with replica.micro_step(last):
            selecting = run.only_targets.selecting(labels) if run.only_targets else nullcontext()
            with autocast_context(tcfg, info.device), selecting:
                target_loss, sums = objectives.batch_loss(replica.forward(**inputs).logits, labels, task, reference, tcfg.dpo_beta)
            replica.backward(target_loss * scale, last)
        reward_sums += 0 if sums is None else sums
        loss_sum += target_loss.detach().double().cpu()
    loss = all_reduce_sum(loss_sum, info).item() / max(1.0, global_targets)
    extras = objectives.reward_metrics(all_reduce_sum(reward_sums, info), global_targets) if task == "preference" else {}
    newest = lambda: f"Newest complete checkpoint: {checkpoints.newest()} (untouched)."  # noqa: E731
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"step {state.step + 1}: loss is {loss}; stopped before the optimizer step. {newest()} "
                            "Lower train.lr, raise train.warmup_steps or use fp32/bf16 instead of fp16.")
    multiplier = run.schedule(state.step)
    grad_norm = replica.step(multiplier)
    if not math.isfinite(grad_norm) and not replica.handles_overflow:
        raise NonFiniteLoss(f"step {state.step + 1}: gradient norm is {grad_norm}; stopped before saving. {newest()} "
                            "Lower train.lr or train.max_grad_norm.")
    return StepResult(loss, grad_norm, tcfg.lr * multiplier, global_real, my_samples, extras)


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Mean loss (and accuracy) over up to `eval_batches` validation batches (data.loader.held_out_batches).

    Every rank scores the same batches: no collective is needed for DDP, and ZeRO-3, whose
    forward gathers parameters from all ranks, gets the same number of forwards on each."""
    tcfg, device, task, rows = run.cfg.train, run.info.device, run.task, run.validation_rows
    run.replica.module.eval()
    loss, targets, correct, reward_sums = 0.0, 0, 0, torch.zeros(3, dtype=torch.float64)
    for ids in held_out_batches(len(rows), tcfg.micro_batch_size, tcfg.eval_batches):
        batch = rows.batch(ids)
        reference = batch.pop("reference_logps", None)
        inputs, labels = objectives.model_inputs({k: v.to(device) for k, v in batch.items()}, task)
        with autocast_context(tcfg, device):
            logits = run.replica.forward(**inputs).logits
        batch_loss, sums = objectives.batch_loss(logits, labels, task, reference, tcfg.dpo_beta)
        loss, reward_sums = loss + batch_loss.item(), reward_sums + (0 if sums is None else sums)
        targets += objectives.target_count(labels, task)
        correct += objectives.correct_count(logits, labels, task) or 0
    run.replica.module.train()
    metrics = {"eval_loss": loss / max(1, targets)}
    if task == "preference":
        metrics.update({f"eval_{k}": v for k, v in objectives.reward_metrics(reward_sums, targets).items()})
    if task == "classification":
        metrics["accuracy"] = correct / max(1, targets)
    return metrics


# ---------------------------------------------------------------- the end


def save_model(run: Run, state: TrainState, tokenized: Path, output: Path, stats: dict) -> None:
    """Collective: the final model (rank 0 writes it) in Hugging Face format, tokenizer, log and stats."""
    full_state = run.replica.full_state_dict()  # collective under ZeRO-3: every rank takes part
    if not run.info.is_main:
        return
    output.mkdir(parents=True, exist_ok=True)
    # DeepSpeed: save the gathered fp32 master weights (ZeRO-3 holds only a shard per rank;
    # under bf16, ZeRO-1/2's module holds bf16 copies), not the module's own tensors.
    gathered = full_state if run.cfg.train.strategy == "deepspeed" else None
    save_trained(run.replica.module, output / "model", state_dict=gathered, method=run.method.name)
    if run.method.adapters_only and run.cfg.model.init == "scratch":
        # Adapters need their base; a scratch base exists nowhere else.
        build_model(run.cfg.model, run.model_task, run.model_meta, run.cfg.train.seed).save_pretrained(output / "base", safe_serialization=True)
    shutil.copytree(tokenized / "tokenizer", output / "tokenizer", dirs_exist_ok=True)
    with open(output / "train_log.jsonl", "w") as f:
        for row in state.history:
            f.write(json.dumps(row) + "\n")
    (output / "train_stats.json").write_text(json.dumps(stats, indent=2))


def run_stats(run: Run, state: TrainState, start_step: int, tokens: int, seconds: float, memory: list[float]) -> dict:
    tcfg = run.cfg.train
    return {
        "task": run.task,
        "method": tcfg.method,
        "strategy": tcfg.strategy,
        "steps": state.step,
        "resumed_from_step": start_step,
        "world_size": run.info.world_size,
        "global_batch_rows": run.global_batch,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "trainable_params": run.trainable,
        "total_params": run.total,
        "tokens_this_run": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "seconds": round(seconds, 2),
        "peak_memory_bytes": [int(m) for m in memory],
        "validations": state.evals,
        "early_stopping": state.early_stopping() if tcfg.early_stopping_patience else None,
        **({"dpo_beta": tcfg.dpo_beta} if run.task == "preference" else {}),
    }


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory_for_reuse()  # before the model and the first batch are allocated
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    stop = StopRequests().install()  # before the slow setup: a signal then still stops at step 1
    info = init_distributed()
    checkpoints = open_checkpoints(args.checkpoints)
    # Rank 0 holds the checkpoint folder while it trains: a second trainer (an orphaned worker, a
    # second run of the same config) stops before it writes a byte, naming the holder.
    with checkpoints.lock(hold=info.is_main):
        run, stopped = train(args, cfg, info, checkpoints, stop)
    barrier(info)
    cleanup(info)
    if info.is_distributed:
        _KEPT_UNTIL_EXIT.append(run)  # not freed when main() returns: see run_and_exit
    return STOPPED_EXIT_CODE if stopped else 0


def train(args: argparse.Namespace, cfg: PipelineConfig, info: DistInfo, checkpoints, stop: StopRequests) -> tuple[Run, bool]:
    """setup -> resume -> train_step until done or stopped (validate, checkpoint) -> save_model.
    Returns the run and whether a stop request ended it early (a checkpoint, no model)."""
    tokenized = local_input(args.tokenized)
    job_output = JobOutput(args.output, args.commit_output, info.is_main)
    output = job_output.path
    run = setup(cfg, tokenized, info, local_input(args.reference) if args.reference else None)
    tcfg = run.cfg.train  # epochs resolved into steps
    state = resume(run, checkpoints)
    start_step, tokens = state.step, 0
    peak = peak_flops(info.device)
    monitor = Monitor(output, info.is_main, tcfg, start_step, run.flops_token, peak * info.world_size if peak else None)
    monitor.start(run.task, info, run.global_batch, run.train_rows.block_size, len(run.train_rows), run.trainable, run.total)
    sample_log = open_sample_log(output, info.rank) if args.log_samples else None

    t0 = time.perf_counter()
    while state.step < tcfg.max_steps and state.stopped_at is None:
        result = train_step(run, state, checkpoints)
        state.step, state.samples_seen = state.step + 1, state.samples_seen + run.global_batch
        state.history.append({"step": state.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, **result.extras})
        tokens += result.real_tokens
        monitor.step(state.step, result.loss, result.lr, result.grad_norm, result.real_tokens)
        if sample_log:
            sample_log.write(json.dumps({"step": state.step, "rank": info.rank, "samples": result.samples}) + "\n")
            sample_log.flush()
        last = state.step == tcfg.max_steps
        if run.validation_rows is not None and (state.step % tcfg.eval_every_steps == 0 or last):
            metrics = validate(run)
            monitor.validation(state.step, metrics)
            if state.record_validation(metrics, tcfg.early_stopping_metric, tcfg.early_stopping_patience):
                monitor.early_stop(state)
        stopping = not last and stop.agreed(info)
        if state.step % tcfg.save_every_steps == 0 or last or state.stopped_at or stopping:
            checkpoints.save(state.step, state.to_dict(), run.replica, info, tcfg.keep_last_checkpoints)
        if stopping:
            announce_stop(info, state.step, stop)
            monitor.close()
            job_output.abandon()
            return run, True
    if sample_log:
        sample_log.close()
    seconds = time.perf_counter() - t0

    memory = [row[0] for row in all_gather_floats([peak_memory_bytes(info.device)], info)]
    stats = run_stats(run, state, start_step, tokens, seconds, memory)
    save_model(run, state, tokenized, output, stats)
    monitor.summary(stats, state, memory)
    monitor.close()
    job_output.commit(stats)
    return run, False


def open_sample_log(output: Path, rank: int):
    (output / "samples").mkdir(parents=True, exist_ok=True)
    return open(output / "samples" / f"rank{rank}.jsonl", "a")


_KEPT_UNTIL_EXIT: list = []
"""Objects that must outlive main() in a torchrun worker, until os._exit (see run_and_exit)."""


def run_and_exit() -> None:
    """Run main() and leave without interpreter teardown.

    Everything is written and closed by then. Teardown itself can deadlock under torchrun with
    gloo: the main thread, holding the GIL, frees DDP's reducer and so joins the process group's
    worker thread, which is freeing the last collective's tensors and waits for the GIL (seen
    with torch 2.13, intermittently, under load). main()'s own return frees its locals too (a
    2-rank run hung there 1 time in 13 under load), so main() hands the run (with its replica) to
    _KEPT_UNTIL_EXIT and a failed run's traceback is kept the same way: nothing is freed before
    os._exit.
    """
    try:
        code = main()
    except SystemExit as e:  # argparse: --help, a bad argument
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException as e:
        traceback.print_exc()
        _KEPT_UNTIL_EXIT.append(e)  # its frames hold the replica
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
