"""The train stage: launch `pipeline.train` under torchrun as a child process and stream its log.

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


def content_fingerprint(model: ModelConfig, train: TrainConfig) -> dict[str, str]:
    """Library versions: a new torch or transformers can change the weights for the same inputs.

    Read from package metadata, not by importing them, to keep fingerprinting cheap.
    """
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers")}


def torchrun_command(nproc_per_node: int, train_args: list[str]) -> list[str]:
    # --standalone: a single-node rendezvous on a free port chosen at run time.
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc_per_node}", "-m", "pipeline.train", *train_args,
    ]


def _die_with_parent() -> None:
    # If the orchestrator is killed (even with SIGKILL), torchrun gets SIGTERM and stops its
    # workers, so an orphaned job never keeps writing checkpoints beside the rerun.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run(model: ModelConfig, train: TrainConfig, *, inputs: dict[str, Path], out: Path, scratch: Path) -> dict:
    task = json.loads((inputs["tokenize"] / "meta.json").read_text()).get("task", "causal_lm")
    if task != "causal_lm":
        # The data stages already produce classification and seq2seq arrays; the trainer's
        # heads and losses for them are the training milestone's work.
        raise NotImplementedError(f"train: task '{task}' is tokenized, but the trainer supports only causal_lm so far")
    scratch.mkdir(parents=True, exist_ok=True)
    config_file = scratch / "train_config.json"
    config_file.write_text(json.dumps({"model": model.model_dump(mode="json"), "train": train.model_dump(mode="json")}, indent=2))
    checkpoints = scratch / "checkpoints"
    args = ["--tokenized", str(inputs["tokenize"]), "--config", str(config_file), "--output", str(out), "--checkpoints", str(checkpoints)]
    cmd = torchrun_command(train.nproc_per_node, args)
    print("[train] " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=preexec) as proc:
        tail: list[str] = []
        for line in proc.stdout:
            print("[train] " + line, end="", flush=True)
            tail = (tail + [line])[-40:]
        code = proc.wait()
    if code != 0:
        raise TrainingFailed(f"training exited with code {code}; last lines:\n" + "".join(tail))
    return json.loads((out / "train_stats.json").read_text())
