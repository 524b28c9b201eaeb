"""A stop signal (Slurm's SIGUSR1 before the time limit, SIGTERM on preemption or requeue) stops
every rank at the same step boundary with a checkpoint; rerunning resumes to the weights of an
uninterrupted run. Real torchrun, two gloo ranks; the signal reaches only one of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_train_distributed import TORCHRUN, train_command, tokenized  # noqa: F401  (a module fixture)
from tiny import REPO, run_ok, sha256, wait_for

pytestmark = pytest.mark.integration
STEPS = "train.max_steps=40"
SLOW = ("train.save_every_steps=1000",)  # no periodic checkpoint: only the stop's


def weights(out: Path) -> str:
    return sha256(out / "model" / "model.safetensors")


def workers_of(launcher: psutil.Process) -> list[psutil.Process]:
    return [p for p in launcher.children(recursive=True) if "pipeline.train" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both_at_one_checkpoint_and_the_rerun_ends_bit_identical(tmp_path, tokenized):  # noqa: F811
    two = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    clean = run_ok(train_command(tokenized, tmp_path / "clean", STEPS, *SLOW, launcher=two), timeout=300)
    assert "stop requested" not in clean.stdout

    root = tmp_path / "stopped"
    stop_file = tmp_path / "stop-request"
    cmd = train_command(tokenized, root, STEPS, *SLOW, launcher=two)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TUNEPIPE_STOP_FILE=str(stop_file)))
    try:
        # Both ranks are training once a step is logged.
        wait_for(lambda: (root / "out" / "samples" / "rank1.jsonl").exists() and (root / "out" / "samples" / "rank1.jsonl").read_text(), 240, "a first step")
        workers = sorted(workers_of(psutil.Process(proc.pid)), key=lambda p: p.environ().get("RANK", ""))
        assert len(workers) == 2
        assert workers[1].environ()["RANK"] == "1"
        workers[1].send_signal(signal.SIGUSR1)  # rank 1 only: rank 0 learns of it at the step boundary
        out = proc.communicate(timeout=240)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0, out[-3000:]
    assert "stop requested (a signal on another rank)" in out, out[-3000:]
    marker = sorted((root / "ckpt").glob("step_*/COMPLETE"))
    assert len(marker) == 1, "exactly the stop's checkpoint"
    step = json.loads(marker[0].read_text())["step"]
    assert 0 < step < 40
    assert not (root / "out" / "model").exists(), "a stopped run writes no model"
    assert not stop_file.exists(), "rank 0 did not get SIGUSR1 itself: no requeue request from it"

    resumed = run_ok(cmd, timeout=300)
    assert f"resuming from {marker[0].parent}" in resumed.stdout
    assert weights(root / "out") == weights(tmp_path / "clean" / "out")


@pytest.mark.slow
def test_sigusr1_on_rank_zero_asks_the_batch_script_to_requeue(tmp_path, tokenized):  # noqa: F811
    stop_file = tmp_path / "stop-request"
    cmd = train_command(tokenized, tmp_path, STEPS, *SLOW, launcher=[sys.executable])
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, TUNEPIPE_STOP_FILE=str(stop_file)))
    try:
        wait_for(lambda: (tmp_path / "out" / "samples" / "rank0.jsonl").exists() and (tmp_path / "out" / "samples" / "rank0.jsonl").read_text(), 240, "a first step")
        proc.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=240)[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, out[-3000:]  # EX_TEMPFAIL: stopped with a checkpoint
    request = json.loads(stop_file.read_text())
    assert request["signal"] == "SIGUSR1"
    assert (tmp_path / "ckpt" / f"step_{request['step']:08d}" / "COMPLETE").is_file()
