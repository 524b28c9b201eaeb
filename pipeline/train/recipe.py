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
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from pipeline.config import PipelineConfig, TrainConfig, load_config
from pipeline.data.loader import open_split
from pipeline.train import cpu_dropout, cpu_matmul, fast_activations, objectives
from pipeline.train.checkpoint import checkpoint_world_size, load_checkpoint
from pipeline.train.checkpoint_stores import open_checkpoints
from pipeline.train.job_output import JobOutput, local_input
from pipeline.train.methods import method_for, save_trained, unwrap
from pipeline.train.modeling import attention_kernel, build_model, count_parameters
from pipeline.train.host import keep_freed_memory_for_reuse
from pipeline.train.observe import Monitor, flops_per_token, peak_flops, peak_memory_bytes
from pipeline.train.parallel.dist import DistInfo, all_gather_floats, barrier, cleanup, init_distributed
from pipeline.train.parallel.optim import lr_multiplier
from pipeline.train.parallel.replica import wrap_model
from pipeline.train.preemption import STOPPED_EXIT_CODE, StopRequests, announce_stop
from pipeline.train.state import TrainState
from pipeline.train.step import NonFiniteLoss, Run, StepResult, settle, train_step, validate  # noqa: F401 (NonFiniteLoss: the trainer's error)


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


# ---------------------------------------------------------------- setup


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

    attention = attention_kernel(cfg.model, info.device, tcfg.precision)
    model = build_model(cfg.model, model_task, model_meta, tcfg.seed, method.load_kwargs(tcfg), attention)
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
    if tcfg.fused_activation:
        fast_activations.install(model)
    onednn = onednn_matmuls(tcfg, info)
    if onednn:
        cpu_matmul.install(model)
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
    only_targets = objectives.TargetPositionsOnly(head, fused=fused_loss_applies(tcfg, info), onednn=onednn) if head is not None else None
    if tcfg.compile:
        # In place (nn.Module.compile): the module, its parameter names and its hooks stay as they
        # are, so the optimizer, checkpoints, DDP and the head hook above see the same model.
        model.compile()
    replica = wrap_model(model, method.parameter_groups(model, tcfg), tcfg, info)
    # Rows padded per batch can be grouped by length (less padding; a bias in the batches).
    lengths = getattr(train_rows, "lengths", None) if tcfg.group_by_length else None
    lengths = None if lengths is None else np.ascontiguousarray(lengths, dtype=np.int64).tobytes()
    return Run(cfg, info, task, method, model_meta, train_rows, validation_rows, replica, only_targets,
               trainable, total, flops_token, lengths, lr_multiplier(tcfg))


def onednn_matmuls(tcfg: TrainConfig, info: DistInfo) -> bool:
    """`train.cpu_matmul` resolved: linear layers through oneDNN on this CPU (train/cpu_matmul.py).
    Not under torch.compile (inductor picks its own kernels) or DeepSpeed (ZeRO-3 replaces the
    linear function with its own, to free gathered weights early)."""
    return (info.device.type == "cpu" and not tcfg.compile and tcfg.strategy != "deepspeed"
            and cpu_matmul.choose(tcfg.cpu_matmul) == "onednn")


def fused_loss_applies(tcfg: TrainConfig, info: DistInfo) -> bool:
    """`train.fused_loss`, unless ZeRO-3 shards the head's weight: the fused loss reads it outside the
    model's forward, where ZeRO-3 holds only this rank's shard."""
    if not tcfg.fused_loss:
        return False
    if tcfg.strategy == "deepspeed":
        from pipeline.train.parallel.zero_config import resolve_config

        stage = resolve_config(tcfg.deepspeed_config, tcfg, info.world_size, info.device.type)["zero_optimization"]["stage"]
        return stage < 3
    return True


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
    pending: list[tuple[int, StepResult]] = []  # trained steps whose loss is still on the device

    def read_pending() -> None:
        tokens_of = [result.real_tokens for _, result in pending]
        for row, real in zip(settle(run, pending, checkpoints), tokens_of):
            state.history.append(row)
            monitor.step(row["step"], row["loss"], row["lr"], row["grad_norm"], real)

    while state.step < tcfg.max_steps and state.stopped_at is None:
        result = train_step(run, state, checkpoints)
        state.step, state.samples_seen = state.step + 1, state.samples_seen + run.global_batch
        pending.append((state.step, result))
        tokens += result.real_tokens
        monitor.advance()
        if sample_log:
            sample_log.write(json.dumps({"step": state.step, "rank": info.rank, "samples": result.samples}) + "\n")
            sample_log.flush()
        last = state.step == tcfg.max_steps
        if state.step % tcfg.log_every_steps == 0 or last:
            read_pending()
        if run.validation_rows is not None and (state.step % tcfg.eval_every_steps == 0 or last):
            read_pending()  # the log rows (and any non-finite loss) come before the validation's
            metrics = validate(run)
            monitor.validation(state.step, metrics)
            if state.record_validation(metrics, tcfg.early_stopping_metric, tcfg.early_stopping_patience):
                monitor.early_stop(state)
        stopping = not last and stop.agreed(info)
        if state.step % tcfg.save_every_steps == 0 or last or state.stopped_at or stopping:
            read_pending()  # a checkpoint holds the history, and never follows a non-finite step
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
