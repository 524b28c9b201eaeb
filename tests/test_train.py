"""The train stage through real processes: torchrun, SIGKILL, resume, DDP on CPU with gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tiny import REPO, cli_args, cli_command, published_weights, sha256

pytestmark = pytest.mark.integration


def run_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli_command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.endswith("summary.json"), last_line
    return json.loads(Path(last_line).read_text())


def stage_status(summary: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in summary["stages"]}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kill_and_resume(tmp_path: Path, steps: dict) -> dict:
    """Run the pipeline to publish once cleanly; once killed with SIGKILL after its first complete
    checkpoint and rerun. Asserts the published weights and per-step losses are bit-identical;
    returns the rerun's summary."""
    clean = run_cli(cli_args("stage", tmp_path / "clean", tmp_path / "reg-clean", "publish", **steps))
    assert stage_status(summary_of(clean))["train"] == "ran"

    workdir, registry = tmp_path / "killed", tmp_path / "reg-killed"
    # A new session, so SIGKILL reaches the CLI, torchrun and the training workers together.
    proc = subprocess.Popen(
        cli_command(*cli_args("stage", workdir, registry, "publish", **steps)),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for(lambda: list(workdir.glob("scratch/train/*/checkpoints/step_*/COMPLETE")), 300, "a first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not list(workdir.glob("train/*/manifest.json")), "training finished before the kill: nothing was tested"

    summary = summary_of(run_cli(cli_args("stage", workdir, registry, "publish", **steps)))
    status = stage_status(summary)
    assert status["train"] == "resumed"
    assert status["ingest"] == status["tokenize"] == "cached"
    train_stats = next(s["stats"] for s in summary["stages"] if s["name"] == "train")
    assert 0 < train_stats["resumed_from_step"] < steps["train.max_steps"]

    assert sha256(published_weights(registry)) == sha256(published_weights(tmp_path / "reg-clean"))
    log = lambda w: (next(Path(w).glob("train/*/train_log.jsonl"))).read_text()  # noqa: E731
    assert log(workdir) == log(tmp_path / "clean"), "per-step losses differ after resume"
    return summary


def test_sigkill_mid_training_under_ddp_two_ranks_resumes_to_bit_identical_weights(tmp_path):
    kill_and_resume(tmp_path, {"train.max_steps": 100, "train.nproc_per_node": 2})


def test_ddp_two_ranks_on_cpu(tmp_path):
    proc = run_cli(cli_args("stage", tmp_path / "w", tmp_path / "r", "train", **{"train.nproc_per_node": 2, "train.max_steps": 10}))
    assert "world size 2 (backend gloo" in proc.stdout
    summary = summary_of(proc)
    train = next(s for s in summary["stages"] if s["name"] == "train")
    assert train["stats"]["world_size"] == 2
    assert train["stats"]["global_batch_rows"] == 8  # micro 4 x accum 1 x world 2
    losses = [json.loads(line)["loss"] for line in (Path(train["output"]) / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and losses[-1] < losses[0]


def test_train_by_hand_with_torchrun_resumes_from_its_checkpoints(tmp_path):
    """The documented manual launch against a committed tokenize output."""
    tokenized = summary_of(run_cli(cli_args("stage", tmp_path / "w", tmp_path / "r", "tokenize")))["stages"][-1]["output"]
    config = tmp_path / "train.yaml"
    config.write_text("model: {n_layer: 1, n_head: 2, n_embd: 32}\ntrain: {max_steps: 6, save_every_steps: 3, micro_batch_size: 2}\n")
    cmd = [
        str(Path(os.sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pipeline.train",
        "--tokenized", tokenized, "--config", str(config), "--output", str(tmp_path / "out"), "--checkpoints", str(tmp_path / "ckpt"),
    ]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    weights = sha256(tmp_path / "out" / "model" / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000003", "step_00000006"]

    again = subprocess.run(cmd + ["--set", "train.max_steps=9"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming from" in again.stdout and "step 6" in again.stdout
    assert sha256(tmp_path / "out" / "model" / "model.safetensors") != weights
