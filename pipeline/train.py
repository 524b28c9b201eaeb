"""Fine-tune a model on the pre-tokenized rows of a committed tokenize output.

One readable recipe: setup -> train (validate and save_checkpoint every N steps) -> save the
final model. It never tokenizes: it memory-maps what the tokenize stage committed (packed
blocks, padded examples, classified texts or source/target pairs; `data_loader.open_split`
picks the layout from meta.json, which also names the task). Run it alone or under torchrun;
the pipeline's train stage launches it exactly like this:

    torchrun --standalone --nproc_per_node 2 -m pipeline.train \
        --tokenized runs/tokenize/<fingerprint> --config examples/quickstart.yaml \
        --output /tmp/model-out --checkpoints /tmp/ckpt [--set train.lr=3e-4]

On several nodes, run on each (node_rank 0 .. N-1; HOST:PORT is node 0's address):

    torchrun --nnodes N --node_rank R --nproc_per_node G --rdzv_backend c10d \
        --rdzv_endpoint HOST:PORT -m pipeline.train --tokenized ... (same arguments on every node)

Rerunning the same command resumes from the newest complete checkpoint in --checkpoints, at the
same sample of the data stream, even with a different number of processes (DDP).
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
from pathlib import Path

import numpy as np
import torch

from pipeline import cpu_dropout, distributed, methods, objectives
from pipeline.checkpoint import checkpoint_world_size, load_checkpoint, newest_complete_checkpoint, save_checkpoint
from pipeline.config import TrainConfig, load_config
from pipeline.data_loader import held_out_batches, micro_batch_ids, open_split, sample_ids
from pipeline.modeling import build_model, count_parameters
from pipeline.observe import Monitor, flops_per_token, human_bytes, peak_flops, peak_memory_bytes, summary_table


class NonFiniteLoss(RuntimeError):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenized", required=True, help="committed tokenize output folder (has meta.json, train/, tokenizer/)")
    p.add_argument("--config", help="pipeline YAML/JSON; its model and train sections are used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    p.add_argument("--output", required=True, help="folder for the final model, tokenizer and train log")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints")
    p.add_argument("--log-samples", action="store_true", help="write the global sample indices each rank trains on to OUTPUT/samples/rank<R>.jsonl")
    return p.parse_args(argv)


def lr_multiplier(cfg: TrainConfig):
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return f


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


@torch.no_grad()
def validate(replica, rows, task: str, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean loss (and accuracy) over up to `eval_batches` validation batches (data_loader.held_out_batches).

    Every rank scores the same batches: no collective is needed for DDP, and ZeRO-3, whose
    forward gathers parameters from all ranks, gets the same number of forwards on each."""
    replica.module.eval()
    loss, targets, correct = 0.0, 0, 0
    for ids in held_out_batches(len(rows), cfg.micro_batch_size, cfg.eval_batches):
        batch = {k: v.to(device) for k, v in rows.batch(ids).items()}
        inputs, labels = objectives.model_inputs(batch, task)
        with autocast_context(cfg, device):
            logits = replica.forward(**inputs).logits
        loss += objectives.summed_loss(logits, labels, task).item()
        targets += objectives.target_count(labels, task)
        correct += objectives.correct_count(logits, labels, task) or 0
    replica.module.train()
    metrics = {"eval_loss": loss / max(1, targets)}
    if task == "classification":
        metrics["accuracy"] = correct / max(1, targets)
    return metrics


def improved(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if metric == "accuracy" else value < best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    tcfg = cfg.train
    info = distributed.init_distributed()
    tokenized, output, ckpt_root = Path(args.tokenized), Path(args.output), Path(args.checkpoints)
    meta = json.loads((tokenized / "meta.json").read_text())
    task = meta.get("task", "causal_lm")
    methods.check_method_runtime(tcfg, info.device.type)

    # ---- setup
    train_rows = open_split(tokenized / "train")
    validation_rows = None
    if tcfg.eval_every_steps and (tokenized / "validation").is_dir():
        validation_rows = open_split(tokenized / "validation")
        validation_rows = validation_rows if len(validation_rows) else None

    # A soft prompt occupies positions too: a scratch model gets room for it in front of the block.
    model_meta = dict(meta, block_size=meta["block_size"] + (tcfg.num_virtual_tokens if tcfg.method == "prompt_tuning" else 0))

    model = build_model(cfg.model, task, model_meta, tcfg.seed, methods.base_load_kwargs(tcfg))
    if tcfg.gradient_checkpointing:
        # Non-reentrant: works when the inputs need no grad (frozen embeddings, LoRA).
        # (transformers 5.23 renamed gradient_checkpointing_enable; older 5.x only has the old name.)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = methods.apply_method(model, tcfg, task, tokenized / "tokenizer")
    if tcfg.fast_cpu_dropout and info.device.type == "cpu":
        cpu_dropout.install(model)
    model.train()
    trainable, total = count_parameters(model)
    flops_token = flops_per_token(model, train_rows.block_size)
    # Causal LM: the output head runs only where a target follows (not on prompts and padding).
    head = methods.unwrap(model).get_output_embeddings() if task == "causal_lm" and tcfg.method != "prompt_tuning" else None
    only_targets = objectives.TargetPositionsOnly(head) if head is not None else None
    replica = distributed.wrap_model(model, methods.parameter_groups(model, tcfg), tcfg, info)
    schedule = lr_multiplier(tcfg)
    global_batch = tcfg.micro_batch_size * tcfg.grad_accum_steps * info.world_size

    start_step, samples_seen, history, evals = 0, 0, [], []
    stop = {"best": None, "best_step": None, "bad": 0, "stopped_at": None}
    resume_from = newest_complete_checkpoint(ckpt_root)
    if resume_from is not None:
        state = load_checkpoint(resume_from, replica, info)
        start_step, samples_seen, history = state["step"], state["samples_seen"], state["history"]
        evals, stop = state.get("evals", []), state.get("early_stopping", stop)
        before = checkpoint_world_size(resume_from)
        changed = f"; world size {before} -> {info.world_size}" if before != info.world_size else ""
        print_main = print if info.is_main else (lambda *a, **k: None)
        print_main(f"resuming from {resume_from} (step {start_step}, sample {samples_seen}{changed})", flush=True)

    monitor = Monitor(output, info.is_main, tcfg.max_steps, start_step, tcfg.tensorboard)
    log = monitor.log
    log(
        f"task {task}, method {tcfg.method}, strategy {tcfg.strategy}"
        + (f" ({tcfg.deepspeed_config})" if tcfg.strategy == "deepspeed" else "")
        + f"; world size {info.world_size} (backend {info.backend or 'none'}, device {info.device})"
    )
    log(
        f"global batch = {tcfg.micro_batch_size} micro x {tcfg.grad_accum_steps} accum x {info.world_size} ranks "
        f"= {global_batch} rows of up to {train_rows.block_size} tokens; {len(train_rows)} train rows"
    )
    log(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    sample_log = None
    if args.log_samples:
        (output / "samples").mkdir(parents=True, exist_ok=True)
        sample_log = open(output / "samples" / f"rank{info.rank}.jsonl", "a")
    peak = peak_flops(info.device)

    # Rows padded per batch can be grouped by length (less padding; a bias in the batches).
    lengths = getattr(train_rows, "lengths", None) if tcfg.group_by_length else None
    lengths = None if lengths is None else np.ascontiguousarray(lengths, dtype=np.int64).tobytes()  # the order's cache key, made once

    # ---- train
    t0, tokens_this_run, step = time.perf_counter(), 0, start_step
    window_start, window_tokens = t0, 0  # the logged rate covers the steps since the last log line
    steps_to_run = range(start_step, tcfg.max_steps) if stop["stopped_at"] is None else range(0)
    for step in steps_to_run:
        torch.manual_seed(step_seed(tcfg.seed, step, info.rank))
        micro_batches, local_real, local_targets, my_samples = [], 0, 0, []
        for m in range(tcfg.grad_accum_steps):
            start, count = micro_batch_ids(samples_seen, m, tcfg.micro_batch_size, info.rank, info.world_size)
            rows = sample_ids(start, count, len(train_rows), tcfg.seed, lengths)
            batch = train_rows.batch(rows)
            micro_batches.append(batch)
            local_real += train_rows.real_tokens(rows)  # throughput counts tokens, not padding
            local_targets += objectives.target_count(batch["labels"], task)
            my_samples.extend(range(start, start + count))
        if sample_log:
            sample_log.write(json.dumps({"step": step + 1, "rank": info.rank, "samples": my_samples}) + "\n")
            sample_log.flush()
        # Normalise by the targets of the whole global step, so every token (or example) weighs
        # the same whatever the accumulation, world size or prompt masking.
        # float64: token counts stay exact far beyond float32's 2^24.
        counts = distributed.all_reduce_sum(torch.tensor([local_targets, local_real], dtype=torch.float64), info)
        global_targets, global_real = counts[0].item(), int(counts[1].item())
        scale = info.world_size / max(1.0, global_targets)  # data parallelism averages gradients over ranks

        loss_sum = torch.zeros((), dtype=torch.float64)
        for m, batch in enumerate(micro_batches):
            last = m == len(micro_batches) - 1
            inputs, labels = objectives.model_inputs({k: v.to(info.device) for k, v in batch.items()}, task)
            with distributed.micro_step(replica, last):
                with autocast_context(tcfg, info.device), only_targets.selecting(labels) if only_targets else nullcontext():
                    logits = replica.forward(**inputs).logits
                    target_loss = objectives.summed_loss(logits, labels, task)
                replica.backward(target_loss * scale, last)
            loss_sum += target_loss.detach().double().cpu()
        step_loss = distributed.all_reduce_sum(loss_sum, info).item() / max(1.0, global_targets)
        if not math.isfinite(step_loss):
            raise NonFiniteLoss(
                f"step {step + 1}: loss is {step_loss}; stopped before the optimizer step. "
                f"Newest complete checkpoint: {newest_complete_checkpoint(ckpt_root) or 'none'} (untouched). "
                "Lower train.lr, raise train.warmup_steps or use fp32/bf16 instead of fp16."
            )
        lr = tcfg.lr * schedule(step)
        grad_norm = replica.step(schedule(step))
        if not math.isfinite(grad_norm) and not getattr(replica, "handles_overflow", False):
            raise NonFiniteLoss(
                f"step {step + 1}: gradient norm is {grad_norm}; stopped before saving. "
                f"Newest complete checkpoint: {newest_complete_checkpoint(ckpt_root) or 'none'} (untouched). "
                "Lower train.lr or train.max_grad_norm."
            )
        samples_seen += global_batch
        tokens_this_run += global_real
        done = step + 1
        history.append({"step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm})

        now = time.perf_counter()
        window_tokens += global_real
        rate = window_tokens / (now - window_start)
        mfu = flops_token * rate / (peak * info.world_size) if peak else None
        monitor.step(done, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate, "mfu": mfu})
        if done % tcfg.log_every_steps == 0 or done == tcfg.max_steps:
            eta = (tcfg.max_steps - done) * (now - t0) / max(1, done - start_step)
            log(
                f"step {done}/{tcfg.max_steps} loss {step_loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                f"tok/s {rate:,.0f}" + (f" mfu {mfu:.1%}" if mfu else "") + f" eta {eta:.0f}s"
            )
            window_start, window_tokens = now, 0
        if validation_rows is not None and (done % tcfg.eval_every_steps == 0 or done == tcfg.max_steps):
            metrics = validate(replica, validation_rows, task, tcfg, info.device)
            evals.append({"step": done, **metrics})
            monitor.validation(done, metrics)
            value = metrics[tcfg.early_stopping_metric]
            if improved(tcfg.early_stopping_metric, value, stop["best"]):
                stop.update(best=value, best_step=done, bad=0)
            else:
                stop["bad"] += 1
            log(f"validation at step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if tcfg.early_stopping_patience and stop["bad"] >= tcfg.early_stopping_patience:
                stop["stopped_at"] = done
                log(
                    f"early stopping at step {done}: {tcfg.early_stopping_metric} has not improved for "
                    f"{stop['bad']} validations (best {stop['best']:.4f} at step {stop['best_step']})"
                )
        if done % tcfg.save_every_steps == 0 or done == tcfg.max_steps or stop["stopped_at"]:
            trainer_state = {"step": done, "samples_seen": samples_seen, "history": history, "evals": evals, "early_stopping": stop}
            save_checkpoint(ckpt_root, done, trainer_state, replica, info, tcfg.keep_last_checkpoints)
        if stop["stopped_at"]:
            break
    if sample_log:
        sample_log.close()
    seconds = time.perf_counter() - t0

    # ---- save the final model (rank 0) in Hugging Face format
    full_state = replica.full_state_dict()  # collective under ZeRO-3: every rank takes part
    memory = [row[0] for row in distributed.all_gather_floats([peak_memory_bytes(info.device)], info)]
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        # DeepSpeed: save the gathered fp32 master weights (ZeRO-3 holds only a shard per rank;
        # under bf16, ZeRO-1/2's module holds bf16 copies), not the module's own tensors.
        gathered = full_state if tcfg.strategy == "deepspeed" else None
        methods.save_trained(replica.module, output / "model", state_dict=gathered)
        if tcfg.method in (*methods.PEFT_METHODS, "adapters") and cfg.model.init == "scratch":
            # Adapters need their base; a scratch base exists nowhere else.
            build_model(cfg.model, task, model_meta, tcfg.seed).save_pretrained(output / "base", safe_serialization=True)
        shutil.copytree(tokenized / "tokenizer", output / "tokenizer", dirs_exist_ok=True)
        with open(output / "train_log.jsonl", "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        stats = {
            "task": task,
            "method": tcfg.method,
            "strategy": tcfg.strategy,
            "steps": history[-1]["step"] if history else start_step,
            "resumed_from_step": start_step,
            "world_size": info.world_size,
            "global_batch_rows": global_batch,
            "final_loss": history[-1]["loss"] if history else None,
            "trainable_params": trainable,
            "total_params": total,
            "tokens_this_run": tokens_this_run,
            "tokens_per_s": round(tokens_this_run / seconds, 1) if seconds > 0 else None,
            "seconds": round(seconds, 2),
            "peak_memory_bytes": [int(m) for m in memory],
            "validations": evals,
            "early_stopping": stop if tcfg.early_stopping_patience else None,
        }
        (output / "train_stats.json").write_text(json.dumps(stats, indent=2))
        rows = [
            ("task / method / strategy", f"{task} / {tcfg.method} / {tcfg.strategy}"),
            ("world size, global batch", f"{info.world_size}, {global_batch} rows"),
            ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"),
            ("steps this run", f"{stats['steps'] - start_step} (from {start_step} to {stats['steps']})"),
            ("real tokens, tokens/s", f"{tokens_this_run:,}, {stats['tokens_per_s'] or 0:,.0f}"),
            ("final train loss", f"{stats['final_loss']:.4f}" if history else "-"),
            ("peak memory per rank", ", ".join(human_bytes(m) for m in memory)),
        ]
        if evals:
            rows.append(("last validation", ", ".join(f"{k} {v:.4f}" for k, v in evals[-1].items() if k != "step")))
        if stop["stopped_at"]:
            rows.append(("early stopping", f"at step {stop['stopped_at']} (best at {stop['best_step']})"))
        log(summary_table(rows))
    monitor.close()
    distributed.barrier(info)
    distributed.cleanup(info)
    if info.is_distributed:
        _KEPT_UNTIL_EXIT.append(replica)  # not freed when main() returns: see run_and_exit
    return 0


_KEPT_UNTIL_EXIT: list = []
"""Objects that must outlive main() in a torchrun worker, until os._exit (see run_and_exit)."""


def run_and_exit() -> None:
    """Run main() and leave without interpreter teardown.

    Everything is written and closed by then. Teardown itself can deadlock under torchrun with
    gloo: the main thread, holding the GIL, frees DDP's reducer and so joins the process group's
    worker thread, which is freeing the last collective's tensors and waits for the GIL (seen
    with torch 2.13, intermittently, under load). main()'s own return frees its locals too (a
    2-rank run hung there 1 time in 13 under load), so main() hands the replica to
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


if __name__ == "__main__":
    run_and_exit()
