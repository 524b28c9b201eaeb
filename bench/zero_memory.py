"""Per-rank model-state memory of DDP and DeepSpeed ZeRO-1/2/3, measured, next to the ZeRO paper.

    .venv/bin/python -m bench.zero_memory                    # bf16 mixed precision (the paper's setting)
    .venv/bin/python -m bench.zero_memory --precision fp32
    # each re-runs itself as: torchrun --standalone --nproc_per_node 2 -m bench.zero_memory --precision ...

A GPT-2 of ~8.7M parameters (Ψ) trains three steps (micro batch 2, grad accumulation 2) under
each strategy, built the way the trainer builds it: `pipeline.train.parallel.replica.wrap_model` for DDP
(under the trainer's `autocast_context`: bf16 autocast, fp32 weights), and
`pipeline.train.parallel.zero.deepspeed_replica` with the shipped deepspeed_configs/zeroN.json,
whose bf16.enabled is filled from train.precision (bf16 weights and gradients, fp32 master).

What is counted: every tensor storage this rank holds as parameters, gradients or optimizer
state, each storage once (by data pointer, so views and aliases are not double counted).
Snapshots are taken after each backward of the last step and after its optimizer step (Adam
state exists by then, DDP has rebuilt its buckets); the largest total is reported, so ZeRO-1's
full-size gradients and DDP's fresh .grad beside its buckets while accumulating are caught. Sources:
  DDP:  module parameters and their .grad, DDP's reducer buckets (captured by a pass-through
        comm hook; with gradient_as_bucket_view the synced .grad are views into them), AdamW state.
  ZeRO: module parameters (+ .grad, + ZeRO-3 `ds_tensor` partitions) and every tensor reachable
        through the ZeRO optimizer's attributes (lists/dicts), classified by attribute name:
        "*grad*" -> gradients, "*fp32*" -> optimizer (fp32 master partition), other -> parameters;
        plus the base AdamW state (exp_avg, exp_avg_sq) -> optimizer.
Not counted, reported on their own: DeepSpeed's gradient staging buckets (ipg buffers), whose
size is `reduce_bucket_size` (5e8 elements each, x2 with overlap_comm) whatever the model; on CPU
they are allocated lazily, only the pages a backward writes become resident.

Paper formulas (Rajbhandari et al. 2020, "ZeRO", sec. 3.1 and Fig. 1), N ranks, Adam, K bytes of
optimizer state per parameter:
  bf16 (mixed precision, K = 12: fp32 master 4 + Adam m 4 + v 4; 16-bit weights and grads)
    DDP     paper 2Ψ + 2Ψ + 12Ψ = 16Ψ; what we run (autocast keeps fp32 weights and grads, Adam
            steps them directly, no master copy) 4Ψ + 4Ψ + 8Ψ = 16Ψ
    ZeRO-1  2Ψ + 2Ψ + 12Ψ/N        ZeRO-2  2Ψ + 14Ψ/N        ZeRO-3  16Ψ/N
  fp32 (no mixed precision; DeepSpeed still keeps a separate fp32 master partition, so K = 12)
    DDP     4Ψ + 4Ψ + 8Ψ = 16Ψ
    ZeRO-1  4Ψ + 4Ψ + 12Ψ/N        ZeRO-2  4Ψ + 16Ψ/N        ZeRO-3  20Ψ/N
ZeRO-3 also keeps tensors under stage3_param_persistence_threshold whole on every rank.
The last line printed is one JSON object with the per-rank totals in bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GRAD_ACCUM, MICRO_BATCH, SEQ = 2, 2, 32
# Measured in the last step: DDP rebuilds its buckets after the first, and until the second one's
# sync the gradients still live in the old buckets, beside the new (a warm-up cost, not steady state).
STEPS = 3
CATEGORIES = ("params", "grads", "optim")
# Where in a step a snapshot is taken: after a backward that only accumulates (DDP's no_sync,
# ZeRO's micro-steps before the boundary), after the last backward (gradients reduced), after step.
PHASES = ("accumulating", "reduced", "stepped")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.zero_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="train.precision for every strategy (default bf16: the ZeRO paper's mixed precision)")
    return parser.parse_args(argv)


def relaunch_under_torchrun(argv: list[str]) -> None:
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bench.zero_memory", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sys.exit(subprocess.call(cmd, env=env, cwd=ROOT))


def tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # Width 768 (GPT-2 small): the big matrices exceed ZeRO-3's 1e6-element persistence
    # threshold, as in any real model; a narrower toy would keep every tensor whole on every rank.
    config = GPT2Config(vocab_size=2048, n_positions=SEQ, n_embd=768, n_layer=1, n_head=12)
    return GPT2LMHeadModel(config).train()


def param_groups(model, lr: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "lr": lr, "initial_lr": lr, "weight_decay": 0.01},
        {"params": no_decay, "lr": lr, "initial_lr": lr, "weight_decay": 0.0},
    ]


def train_config(precision: str, strategy: str, deepspeed_config: str = "zero2"):
    from pipeline.config import TrainConfig

    return TrainConfig(
        micro_batch_size=MICRO_BATCH, grad_accum_steps=GRAD_ACCUM, precision=precision,
        strategy=strategy, deepspeed_config=deepspeed_config,
    )


class Ledger:
    """Storages seen in one snapshot, each counted once, under the first category that claims it."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys(CATEGORIES, 0)

    def add(self, tensor, category: str) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes[category] += storage.nbytes()

    def walk(self, obj, category: str, depth: int = 0) -> None:
        import torch

        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            self.add(obj, category)
            if obj.grad is not None:
                self.add(obj.grad, "grads")
        elif isinstance(obj, dict):
            for value in obj.values():
                self.walk(value, category, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                self.walk(value, category, depth + 1)


def ddp_snapshot(model, optimizer, buckets: dict) -> dict:
    ledger = Ledger()
    for p in model.parameters():
        ledger.add(p, "params")
    for p in model.parameters():
        ledger.add(p.grad, "grads")
    for b in buckets.values():
        ledger.add(b, "grads")
    ledger.walk(list(optimizer.state.values()), "optim")
    return {**ledger.bytes, "ipg": 0}


def zero_snapshot(replica) -> dict:
    ledger = Ledger()
    params = list(replica.module.parameters())
    for p in params:
        ledger.add(p, "params")
        ledger.add(getattr(p, "ds_tensor", None), "params")
        ledger.add(p.grad, "grads")
    zero = replica.engine.optimizer
    ledger.walk(list(zero.optimizer.state.values()), "optim")
    for name, value in vars(zero).items():
        if name == "optimizer":
            continue
        category = "grads" if "grad" in name else "optim" if "fp32" in name else "params"
        ledger.walk(value, category)
    return {**ledger.bytes, "ipg": ipg_buffer_bytes(replica)}


def ipg_buffer_bytes(replica) -> int:
    # ZeRO-1/2 keep a list of buffers per bucket (two with overlap_comm), ZeRO-3 one tensor.
    total = 0
    for bucket in getattr(replica.engine.optimizer, "ipg_buckets", {}).values():
        buffers = bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        total += sum(t.untyped_storage().nbytes() for t in buffers if t is not None)
    return total


def batch(step: int, micro: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    ids = torch.randint(0, 2048, (MICRO_BATCH, SEQ), generator=g)
    return ids


def loss_of(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="mean")


def total(snapshot: dict) -> int:
    return sum(snapshot[c] for c in CATEGORIES)


def run_two_steps(replica, cfg, info, snapshot) -> dict:
    """Train two steps through the Replica interface, as pipeline/train/recipe.py does (same accumulation
    context, same autocast); the second step's snapshots: the largest per phase, and the peak."""
    from pipeline.train.precision import autocast_context

    by_phase: dict[str, dict] = {}
    for step in range(STEPS):
        for m in range(GRAD_ACCUM):
            ids, last = batch(step, m, info.rank), m == GRAD_ACCUM - 1
            with replica.micro_step(last):
                with autocast_context(cfg, info.device):
                    loss = loss_of(replica.forward(input_ids=ids, use_cache=False).logits, ids) / GRAD_ACCUM
                replica.backward(loss, last)
            if step == STEPS - 1:
                by_phase["reduced" if last else "accumulating"] = snapshot()
        replica.step(1.0)
        if step == STEPS - 1:
            by_phase["stepped"] = snapshot()
    ipg = max(s["ipg"] for s in by_phase.values())
    peak = max(by_phase.values(), key=total)
    return {**peak, "ipg": ipg, "by_phase": {phase: total(s) for phase, s in by_phase.items()}}


def measure_ddp(info, precision: str) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from pipeline.train.parallel.replica import wrap_model

    model = tiny_gpt2()
    cfg = train_config(precision, "ddp")
    replica = wrap_model(model, param_groups(model, 1e-4), cfg, info)
    buckets: dict = {}

    def recording_hook(state, bucket):  # pass-through: only notes which buffers the reducer owns
        # Keyed by index: DDP rebuilds its buckets after the first iteration, and holding the old
        # ones here would count (and keep alive) buffers the reducer has dropped.
        buckets[bucket.index()] = bucket.buffer()
        return allreduce_hook(state, bucket)

    replica.wrapped.register_comm_hook(None, recording_hook)
    peak = run_two_steps(replica, cfg, info, lambda: ddp_snapshot(model, replica.optimizer, buckets))
    return {**peak, "psi": sum(p.numel() for p in model.parameters())}


def measure_zero(info, precision: str, name: str) -> dict:
    from pipeline.train.parallel.zero import deepspeed_replica

    model = tiny_gpt2()
    psi = sum(p.numel() for p in model.parameters())
    cfg = train_config(precision, "deepspeed", name)
    replica = deepspeed_replica(model, param_groups(model, 1e-4), cfg, info)
    weight_dtype = next(replica.module.parameters()).dtype
    peak = run_two_steps(replica, cfg, info, lambda: zero_snapshot(replica))
    replica.engine.destroy()
    return {**peak, "psi": psi, "weight_dtype": str(weight_dtype).removeprefix("torch.")}


def formula(precision: str, name: str) -> tuple[str, object]:
    """The paper's per-rank model states for `name` in bytes per parameter: (text, f(N))."""
    p = g = 2 if precision == "bf16" else 4  # 16-bit weights and gradients under mixed precision
    k = 12  # fp32 master 4 + Adam m 4 + v 4 (DeepSpeed keeps the master copy in fp32 runs too)
    if name == "ddp":
        # What we run keeps fp32 weights and grads (autocast) and no master copy: 4 + 4 + 8. The
        # paper's mixed-precision DDP is 2 + 2 + 12; both are 16 bytes per parameter.
        return ("4+4+8" + (" (paper 2+2+12)" if precision == "bf16" else ""), lambda n: 16)
    return {
        "zero1": (f"{p}+{g}+{k}/N", lambda n: p + g + k / n),
        "zero2": (f"{p}+{g + k}/N", lambda n: p + (g + k) / n),
        "zero3": (f"{p + g + k}/N", lambda n: (p + g + k) / n),
    }[name]


def report(gathered: list[dict], precision: str, n: int) -> dict:
    """Print the table for the larger of the ranks (ZeRO's last partition is padded); the totals."""
    psi = gathered[0]["ddp"]["psi"]
    mb = lambda b: f"{b / 2**20:8.2f}"  # noqa: E731
    rows = {name: max((g[name] for g in gathered), key=total) for name in gathered[0]}
    zero_dtype = rows["zero3"]["weight_dtype"]
    print(
        f"\nper-rank model states, {n} CPU ranks, --precision {precision} (ZeRO weights {zero_dtype}, "
        f"DDP weights float32{' under bf16 autocast' if precision == 'bf16' else ''}), "
        f"Ψ = {psi:,} parameters ({4 * psi / 2**20:.1f} MiB per fp32 copy)"
    )
    print(
        f"{'strategy':8s} {'params MiB':>10s} {'grads MiB':>10s} {'optim MiB':>10s} {'total MiB':>10s} {'bytes/Ψ':>8s} "
        f"{'paper formula':>22s} {'paper bytes/Ψ':>13s} {'vs DDP':>7s} {'ipg buffers MiB':>16s}"
    )
    totals = {name: total(r) for name, r in rows.items()}
    for name, r in rows.items():
        text, per_param = formula(precision, name)
        print(
            f"{name:8s} {mb(r['params']):>10s} {mb(r['grads']):>10s} {mb(r['optim']):>10s} {mb(totals[name]):>10s} "
            f"{totals[name] / psi:8.2f} {text:>22s} {per_param(n):13.2f} {totals[name] / totals['ddp']:7.2f} {mb(r['ipg']):>16s}"
        )
    phases = lambda name: ", ".join(f"{ph} {rows[name]['by_phase'][ph] / psi:.2f}" for ph in PHASES)  # noqa: E731
    print("bytes/Ψ by phase of the last step (largest rank):")
    for name in rows:
        print(f"  {name:6s} {phases(name)}")
    ddp = rows["ddp"]["by_phase"]
    w = 2 if precision == "bf16" else 4  # bytes per weight and per gradient element in the ZeRO engines
    notes = ["where measured and paper differ:"]
    if ddp["accumulating"] > ddp["reduced"]:
        notes.append(
            f"  ddp    +{(ddp['accumulating'] - ddp['reduced']) / psi:.2f} B/Ψ while accumulating: DDPReplica.step zeroes with set_to_none=True,\n"
            "         so no_sync micro-steps allocate fresh .grad beside the reducer buckets; from the synced micro-step on\n"
            "         .grad are views into the buckets (gradient_as_bucket_view). zero_grad(set_to_none=False) keeps them views."
        )
    notes += [
        f"  zero2  grads above {w}Ψ/N (zero1 too, once reduced): the gradients of every parameter this rank's partition\n"
        "         touches are held whole (all_grad_tensors), so a matrix straddling the partition boundary counts in\n"
        "         full; here the 2.4M-element MLP c_fc, a large share of a 1-layer model",
        f"  zero3  params above {w}Ψ/N: tensors under stage3_param_persistence_threshold (1e6 elements: attention\n"
        "         c_proj, biases, norms, positions) stay whole on every rank",
        "  ipg    fixed-size staging buckets (reduce_bucket_size), not model states; ZeRO-2 allocates them at\n"
        "         the start of each backward and frees them at its end, so these snapshots miss them",
    ]
    print("\n".join(notes))
    print(
        f"ZeRO-3 / DDP: {totals['zero3'] / totals['ddp']:.2f} against DDP's peak above, "
        f"{totals['zero3'] / ddp['reduced']:.2f} against DDP once reduced ({ddp['reduced'] / psi:.2f} B/Ψ, the lean 16Ψ)"
    )
    return totals


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        relaunch_under_torchrun(argv)
    import logging

    import torch.distributed as dist

    from pipeline.train.parallel import dist as distributed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    info = distributed.init_distributed()
    rows = {"ddp": measure_ddp(info, args.precision)}
    for name in ("zero1", "zero2", "zero3"):
        gc.collect()
        rows[name] = measure_zero(info, args.precision, name)
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, rows)
    if info.is_main:
        totals = report(gathered, args.precision, info.world_size)
        print(json.dumps({f"{k}_bytes": v for k, v in totals.items()}))
    distributed.barrier(info)
    distributed.cleanup(info)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
