"""Fine-tune a causal LM on the pre-packed blocks of a committed tokenize output.

One readable recipe: setup -> train (save_checkpoint every N steps) -> save the final model.
It never tokenizes: it memory-maps the rows the tokenize stage committed (packed blocks, or
examples padded per batch; `data_loader.open_split` picks the layout). Run it alone or
under torchrun; the pipeline's train stage launches it exactly like this:

    torchrun --standalone --nproc_per_node 2 -m pipeline.train \
        --tokenized runs/tokenize/<fingerprint> --config examples/quickstart.yaml \
        --output /tmp/model-out --checkpoints /tmp/ckpt [--set train.lr=3e-4]

Rerunning the same command resumes from the newest complete checkpoint in --checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.checkpoint import load_checkpoint, newest_complete_checkpoint, save_checkpoint
from pipeline.config import TrainConfig, load_config
from pipeline.data_loader import micro_batch_ids, open_split, sample_ids
from pipeline.modeling import build_model, count_parameters


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenized", required=True, help="committed tokenize output folder (has meta.json, train/, tokenizer/)")
    p.add_argument("--config", help="pipeline YAML/JSON; only its model and train sections are used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4")
    p.add_argument("--output", required=True, help="folder for the final model, tokenizer and train log")
    p.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints")
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


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm gains (1-D tensors): decaying them only hurts.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def autocast_context(cfg: TrainConfig, device: torch.device):
    if device.type == "cuda" and cfg.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cfg.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def step_seed(seed: int, step: int, rank: int) -> int:
    # Dropout noise is a pure function of (seed, step, rank): a resumed run draws exactly what
    # the uninterrupted run drew, even if some RNG consumer outside this loop changes.
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    tcfg = cfg.train
    info = distributed.init_distributed()
    log = print if info.is_main else (lambda *a, **k: None)
    tokenized, output, ckpt_root = Path(args.tokenized), Path(args.output), Path(args.checkpoints)
    meta = json.loads((tokenized / "meta.json").read_text())

    # ---- setup
    blocks = open_split(tokenized / "train")
    model = build_model(cfg.model, meta["vocab_size"], meta["block_size"], meta["eos_id"], meta["pad_id"], tcfg.seed)
    model.to(info.device).train()
    trainable, total = count_parameters(model)
    ddp_model = distributed.wrap_model(model, info)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(tcfg))
    global_batch = tcfg.micro_batch_size * tcfg.grad_accum_steps * info.world_size

    start_step, samples_seen, history = 0, 0, []
    resume_from = newest_complete_checkpoint(ckpt_root)
    if resume_from is not None:
        state = load_checkpoint(resume_from, info)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, samples_seen, history = state["step"], state["samples_seen"], state["history"]
        log(f"resuming from {resume_from} (step {start_step}, sample {samples_seen})")

    log(
        f"world size {info.world_size} (backend {info.backend or 'none'}, device {info.device}); "
        f"global batch = {tcfg.micro_batch_size} x {tcfg.grad_accum_steps} x {info.world_size} = {global_batch} blocks "
        f"of {blocks.block_size} tokens; {len(blocks)} train blocks"
    )
    log(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.1f}%)")

    # ---- train
    t0, tokens_this_run = time.perf_counter(), 0
    for step in range(start_step, tcfg.max_steps):
        torch.manual_seed(step_seed(tcfg.seed, step, info.rank))
        micro_batches, local_real = [], 0
        for m in range(tcfg.grad_accum_steps):
            start, count = micro_batch_ids(samples_seen, m, tcfg.micro_batch_size, info.rank, info.world_size)
            rows = sample_ids(start, count, len(blocks), tcfg.seed)
            micro_batches.append(blocks.batch(rows))
            local_real += blocks.real_tokens(rows)  # throughput counts tokens, not padding
        # Normalise by the label tokens of the whole global step, so every token weighs the
        # same whatever the accumulation, world size or prompt masking.
        local_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        # float64: token counts stay exact far beyond float32's 2^24.
        counts = distributed.all_reduce_sum(torch.tensor([local_targets, local_real], dtype=torch.float64), info)
        global_targets, global_real = counts[0].item(), int(counts[1].item())
        scale = info.world_size / max(1.0, global_targets)  # DDP averages gradients over ranks

        loss_sum = torch.zeros((), dtype=torch.float64)
        for m, batch in enumerate(micro_batches):
            batch = {k: v.to(info.device) for k, v in batch.items()}
            y = batch.pop("labels")  # the loss is ours (summed, normalised per step), not the model's
            with distributed.no_grad_sync(ddp_model, sync=m == len(micro_batches) - 1), autocast_context(tcfg, info.device):
                # use_cache=False: no KV cache is wanted in training, and without one transformers
                # reads restarting position_ids (bins packing) as separate documents and masks
                # attention between them, on sdpa and eager too, not only flash-attention varlen.
                logits = ddp_model(**batch, use_cache=False).logits
                token_loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=-100, reduction="sum"
                )
                (token_loss * scale).backward()
            loss_sum += token_loss.detach().double().cpu()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        samples_seen += global_batch
        tokens_this_run += global_real

        step_loss = distributed.all_reduce_sum(loss_sum, info).item() / max(1.0, global_targets)
        history.append({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm)})
        done = step + 1
        if done % tcfg.log_every_steps == 0 or done == tcfg.max_steps:
            elapsed = time.perf_counter() - t0
            rate = tokens_this_run / elapsed
            eta = (tcfg.max_steps - done) * elapsed / max(1, done - start_step)
            log(
                f"step {done}/{tcfg.max_steps} loss {step_loss:.4f} lr {lr:.2e} grad_norm {float(grad_norm):.3f} "
                f"tok/s {rate:,.0f} eta {eta:.0f}s",
                flush=True,
            )
        if done % tcfg.save_every_steps == 0 or done == tcfg.max_steps:
            trainer_state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": done,
                "samples_seen": samples_seen,
                "history": history,
            }
            save_checkpoint(ckpt_root, done, trainer_state, info, tcfg.keep_last_checkpoints)

    # ---- save the final model (rank 0) in Hugging Face format
    seconds = time.perf_counter() - t0
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output / "model", safe_serialization=True)
        shutil.copytree(tokenized / "tokenizer", output / "tokenizer", dirs_exist_ok=True)
        with open(output / "train_log.jsonl", "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        stats = {
            "steps": tcfg.max_steps,
            "resumed_from_step": start_step,
            "world_size": info.world_size,
            "global_batch_blocks": global_batch,
            "final_loss": history[-1]["loss"] if history else None,
            "trainable_params": trainable,
            "total_params": total,
            "tokens_this_run": tokens_this_run,
            "tokens_per_s": round(tokens_this_run / seconds, 1) if seconds > 0 else None,
            "seconds": round(seconds, 2),
        }
        (output / "train_stats.json").write_text(json.dumps(stats, indent=2))
        log(f"trained {tcfg.max_steps - start_step} steps in {seconds:.1f}s; final loss {stats['final_loss']:.4f}")
    distributed.barrier(info)
    distributed.cleanup(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
