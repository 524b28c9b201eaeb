"""The train stage: launch `pipeline.train.recipe` under torchrun as a child process and stream its log.

Training runs in its own processes so the orchestrator (Prefect or the CLI) never imports
torch.distributed and a crashed rank cannot take the orchestrator down with it. Checkpoints go
to the stage's scratch folder, which outlives a crash, so rerunning resumes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
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


# Runs `python -m ...` once it has asked for SIGTERM when this orchestrator dies (even by SIGKILL):
# torchrun then stops its workers, which die with torchrun themselves (parallel/dist.py), so an
# orphaned job never keeps writing checkpoints beside the rerun. Armed in the child, not through
# Popen's preexec_fn, which is unsafe in a process with threads (Prefect runs some); the parent's
# pid is checked after arming, in case it died first.
_BOUND_TO_PARENT = (
    "import ctypes, os, runpy, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "module, sys.argv = sys.argv[3], [sys.argv[3], *sys.argv[4:]]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def bound_to_this_process(command: list[str]) -> list[str]:
    """`command` (python -m MODULE ...) made to end with this process, on Linux."""
    if not sys.platform.startswith("linux") or command[1:2] != ["-m"]:
        return command
    return [command[0], "-c", _BOUND_TO_PARENT, str(os.getpid()), *command[1:]]


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
    with subprocess.Popen(bound_to_this_process(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        tail = _relay(proc)
        code = proc.wait()
    if code != 0:
        raise TrainingFailed(f"training exited with code {code}; last lines:\n" + "".join(tail))
    return json.loads((out / "train_stats.json").read_text())
