"""The train stage: launch `pipeline.train.recipe` under torchrun as a child process and stream its log.

Training runs in its own processes so the orchestrator (Prefect or the CLI) never imports
torch.distributed and a crashed rank cannot take the orchestrator down with it. Checkpoints go
to the stage's scratch folder, which outlives a crash, so rerunning resumes.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import ModelConfig, TrainConfig


class TrainingFailed(RuntimeError):
    pass


WORKER = "pipeline.train"
"""The module torchrun runs (`-m`): the recipe. Its imports are part of this stage's code version."""


def content_fingerprint(model: ModelConfig, train: TrainConfig) -> dict[str, str]:
    """Library versions (a new torch or transformers can change the weights for the same inputs),
    read from package metadata, not by importing them, to keep fingerprinting cheap; and the
    DeepSpeed JSON a run uses, which may be a user's own file edited between runs."""
    found = {name: importlib.metadata.version(name) for name in ("torch", "transformers")}
    if train.strategy == "deepspeed":
        from pipeline.train.parallel.zero_config import config_digest

        found["deepspeed_config"] = config_digest(train.deepspeed_config)
    return found


def torchrun_command(nproc_per_node: int, train_args: list[str]) -> list[str]:
    # --standalone: a single-node rendezvous on a free port chosen at run time.
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc_per_node}", "-m", WORKER, *train_args,
    ]


def _die_with_parent() -> None:
    # If the orchestrator is killed (even with SIGKILL), torchrun gets SIGTERM and stops its
    # workers, so an orphaned job never keeps writing checkpoints beside the rerun.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def preflight(model: ModelConfig, train: TrainConfig) -> list[str]:
    """Errors a run would otherwise hit only after the data stages, raised before any work; and
    warnings about settings that run but will disappoint (adapters on a random base)."""
    cuda = _cuda_available()
    if train.precision == "fp16" and not cuda:
        raise ValueError("train.precision fp16 needs a CUDA device (no fp16 kernels for training on CPU); use bf16 or fp32")
    from pipeline.train.methods import method_for

    warnings = method_for(train).check(train, model, "cuda" if cuda else "cpu")  # qlora: CUDA and bitsandbytes
    if train.strategy == "deepspeed":
        from pipeline.train.parallel.zero_config import resolve_config

        resolve_config(train.deepspeed_config, train, world_size=train.nproc_per_node, device_type="cuda" if cuda else "cpu")
    return warnings


def _cuda_available() -> bool:
    import torch  # the orchestrator imports torch but never torch.distributed

    return torch.cuda.is_available()


def _relay(proc: subprocess.Popen) -> list[str]:
    """Copy the job's output through as it comes, \r included (a progress bar redraws in place);
    keep the last 40 lines for the error message."""
    tail, pending = [], b""
    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    while chunk := os.read(proc.stdout.fileno(), 65536):
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stdout.write(chunk.decode("utf-8", "replace"))
        pending += chunk
        *lines, pending = pending.split(b"\n")
        tail = (tail + [line.decode("utf-8", "replace") + "\n" for line in lines])[-40:]
    return tail + ([pending.decode("utf-8", "replace")] if pending else [])


def run(model: ModelConfig, train: TrainConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    preflight(model, train)
    scratch.mkdir(parents=True, exist_ok=True)
    config_file = scratch / "train_config.json"
    config_file.write_text(json.dumps({"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json")}, indent=2))
    checkpoints = scratch / "checkpoints"
    args = ["--tokenized", str(inputs["tokenize"]), "--config", str(config_file), "--output", str(out), "--checkpoints", str(checkpoints)]
    cmd = torchrun_command(train.nproc_per_node, args)
    print("[train] " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if sys.stdout.isatty():
        env["TUNEPIPE_PROGRESS"] = "1"  # the job's stderr is a pipe; tell it a person is watching
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec) as proc:
        tail = _relay(proc)
        code = proc.wait()
    if code != 0:
        raise TrainingFailed(f"training exited with code {code}; last lines:\n" + "".join(tail))
    return json.loads((out / "train_stats.json").read_text())
