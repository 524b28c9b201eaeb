"""DeepSpeed ZeRO behind the `Replica` interface (replica.py).

    replica = deepspeed_replica(model, parameter_groups(model, cfg.train), cfg.train, info)

`DeepSpeedReplica` makes a DeepSpeed engine behave exactly like the DDP replica: same gradient
(rank average, summed over micro-steps), one optimizer step per trainer step, lr set by the
trainer, pre-clip grad norm returned, sharded save/load that resumes bit for bit. The JSON it
runs with comes from zero_config.py.

Proven on CPU with 2 gloo ranks under torchrun by bench/zero_memory.py and
tests/test_deepspeed_engine.py (integration tier).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.train.parallel.dist import DistInfo
from pipeline.train.parallel.optim import build_optimizer, set_lr
from pipeline.train.parallel.zero_config import resolve_config

_TAG = "deepspeed"  # one engine checkpoint per folder: checkpoint.py owns the step folders
_META = "deepspeed_replica.json"


# ---------------------------------------------------------------- replica


class DeepSpeedReplica:
    """The Replica interface over a DeepSpeed engine. Build it with `deepspeed_replica`."""

    def __init__(self, engine, info: DistInfo, grad_accum_steps: int):
        self.engine = engine
        self.module = engine.module
        self.info = info
        self.grad_accum_steps = grad_accum_steps
        # fp16: the dynamic loss scaler skips a step whose gradients overflowed (step() returns inf).
        self.handles_overflow = engine.fp16_enabled()
        self.skips_on_device = False  # the engine reads its gradient norm on the host at every step

    def micro_step(self, last: bool):
        return nullcontext()  # DeepSpeed tracks accumulation boundaries itself (see backward)

    def forward(self, **batch):
        # Through the engine, not the module: ZeRO-3 gathers parameters and resets its
        # per-backward bookkeeping in engine.forward.
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        # DeepSpeed decides the accumulation boundary from its own micro-step counter; a trainer
        # that disagrees would reduce (ZeRO-1) or step at the wrong time, silently.
        if self.engine.is_gradient_accumulation_boundary() != last_micro_step:
            raise RuntimeError(
                f"DeepSpeed is at micro-step {self.engine.micro_steps % self.grad_accum_steps + 1} of "
                f"{self.grad_accum_steps} but the trainer says last_micro_step={last_micro_step}: "
                "call backward exactly train.grad_accum_steps times per step()"
            )
        # The trainer's loss is already its share of the global mean; DeepSpeed averages over
        # ranks like DDP does, but would also divide by the accumulation steps: don't let it.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last_micro_step:
            # Managed accumulation counts micro-steps in engine.step(); off the boundary it only
            # advances that counter (no reduction of ZeRO-1 grads, no update).
            self.engine.step()

    def step(self, lr_multiplier: float, loss=None) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("step() before the last micro-step's backward: DeepSpeed would not update")
        set_lr(self.engine.optimizer, lr_multiplier)
        steps_before = self.engine.global_steps
        self.engine.step()  # clips to gradient_clipping, steps, zeroes grads
        if self.engine.global_steps != steps_before + 1:
            raise RuntimeError(f"DeepSpeed took {self.engine.global_steps - steps_before} optimizer steps instead of 1")
        norm = self.engine.get_global_grad_norm()  # before clipping; inf when the step was skipped
        return float("nan") if norm is None else float(norm)

    # -- checkpoints: each rank writes its own shard of weights and optimizer state

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        if self.info.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            meta = {"world_size": self.info.world_size, "zero_stage": self.engine.zero_optimization_stage(), "tag": _TAG}
            (folder / _META).write_text(json.dumps(meta))
        # Collective, with barriers inside: when it returns every rank's shard is written.
        self.engine.save_checkpoint(str(folder), tag=_TAG, client_state={}, save_latest=False)

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        meta_file = folder / _META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{folder} holds no DeepSpeed checkpoint ({_META} missing): was it saved with train.strategy=ddp?")
        meta = json.loads(meta_file.read_text())
        shards = sorted((folder / meta["tag"]).glob("*zero_pp_rank_*_optim_states.pt"))
        saved_world = len(shards)
        if saved_world != meta["world_size"]:
            raise RuntimeError(f"{folder}: {_META} says world size {meta['world_size']} but {saved_world} optimizer shards are present")
        if saved_world != self.info.world_size:
            # ZeRO shards are cut per rank; re-cutting needs DeepSpeed's universal-checkpoint
            # conversion (ds_to_universal.py), which this pipeline does not run.
            raise RuntimeError(
                f"{folder} was saved by {saved_world} ranks but this run has {self.info.world_size}: "
                "a DeepSpeed ZeRO checkpoint resumes only at the world size that wrote it "
                f"(set train.nproc_per_node={saved_world}, or start from the exported model)"
            )
        stage = self.engine.zero_optimization_stage()
        if meta["zero_stage"] != stage:
            raise RuntimeError(f"{folder} holds a ZeRO stage {meta['zero_stage']} checkpoint; this run uses stage {stage}")
        _load_data_only(self.engine)
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=meta["tag"], load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
        )
        if path is None:  # DeepSpeed only logs a warning here
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")

    def full_state_dict(self) -> dict | None:
        """Collective: rank 0 gets module.state_dict() keys with full fp32 CPU tensors; others None.

        Trainable weights come from the optimizer's fp32 master copy (exact under bf16 too);
        frozen ones from the module (gathered one at a time under ZeRO-3, to bound memory).
        """
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        done: dict[int, torch.Tensor] = {}  # tied weights (GPT-2 wte / lm_head) are one Parameter
        for key, value in self.module.state_dict(keep_vars=True).items():
            if id(value) in done:
                full = done[id(value)]
            else:
                full = safe_get_full_fp32_param(value) if isinstance(value, torch.nn.Parameter) else None
                if full is None and hasattr(value, "ds_id"):  # frozen ZeRO-3 parameter
                    with zero.GatheredParameters([value], modifier_rank=None):
                        full = value.detach().clone()
                elif full is None:  # buffer, or a frozen ZeRO-1/2 parameter (replicated)
                    full = value.detach()
                full = full.to("cpu", torch.float32 if full.is_floating_point() else full.dtype).clone()
                done[id(value)] = full
            if self.info.is_main:
                out[key] = full
        return out if self.info.is_main else None


def _deepspeed_state_classes() -> list:
    """The classes of DeepSpeed's own that its ZeRO-1/2/3 checkpoints pickle (found by loading them
    with weights_only=True); nothing else may be unpickled from a checkpoint."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_data_only(engine) -> None:
    """DeepSpeed's checkpoint engine unpickles with weights_only=False, so a planted file in the
    checkpoint folder would run its code on resume. Route every load through weights_only=True,
    allowing DeepSpeed's own state classes and nothing else."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        raise RuntimeError("this DeepSpeed version has no checkpoint_engine to load through; refusing to unpickle its checkpoint")
    allowed = _deepspeed_state_classes()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load


def _ensure_process_group(info: DistInfo) -> None:
    """DeepSpeed needs a process group even alone; torchrun-less runs have none (DistInfo backend None)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if info.world_size != 1:
            raise RuntimeError("init_distributed() must run before deepspeed_replica() with more than one rank")
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        # A private in-memory store: no port to pick, nothing another process can join.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # deepspeed.comm reads these even when the group exists


def _skip_inference_only_ops() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op when it starts
    (deepspeed_shm_comm: 50-85 s of C++ on 2 cores, and again for every new virtualenv path, since
    the build's include paths change). Only tensor-parallel inference (`inference_all_reduce`) uses
    it; training's collectives go through torch.distributed (gloo). Marked incompatible, DeepSpeed
    skips it as it does off Linux (deepspeed/comm/torch.py: build_shm_op)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_replica(model: torch.nn.Module, param_groups: list[dict], cfg: TrainConfig, info: DistInfo) -> DeepSpeedReplica:
    """Wrap `model` (unwrapped, not DDP; requires_grad already set) in a DeepSpeed engine.

    `param_groups`: AdamW groups ({"params", "lr", "weight_decay", ...}) over trainable params.
    """
    import deepspeed

    if info.device.type == "cpu":
        _skip_inference_only_ops()
    _ensure_process_group(info)
    ds_config = resolve_config(cfg.deepspeed_config, cfg, info.world_size, info.device.type)
    # Same optimizer as the DDP path (optim.build_optimizer): DeepSpeed shards and
    # steps it but its maths is torch's AdamW, so ZeRO and DDP give the same update.
    optimizer = build_optimizer(param_groups, cfg, fused=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return DeepSpeedReplica(engine, info, cfg.grad_accum_steps)
