"""The trainer across processes through real torchrun on CPU (gloo): a resume at another world
size continues at the same sample; 2 nodes x 1 process form one world; DeepSpeed ZeRO-2/-3
resume bit-identically, also from the disk state a kill during a checkpoint save leaves."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import REPO, cli_args, kill_and_resume, run_cli, run_ok, sha256, summary_of, train_losses, trainer_args

pytestmark = pytest.mark.integration
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN_YAML = "model: {n_layer: 1, n_head: 2, n_embd: 32}\ntrain: {warmup_steps: 2, micro_batch_size: 4, save_every_steps: 2, tensorboard: false}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dist")
    return summary_of(run_cli(cli_args("stage", root / "w", root / "r", "tokenize")))["stages"][-1]["output"]


def train_command(tokenized: str, root: Path, *overrides: str, launcher: list[str]) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "train.yaml"
    config.write_text(TRAIN_YAML)
    return [*launcher, "-m", "pipeline.train", *trainer_args(tokenized, root, *overrides, config=config), "--log-samples"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return run_ok(cmd, timeout=300)


def trained_samples(out: Path) -> list[int]:
    """Global sample indices trained on, from every rank's log; a step logged twice (a run killed
    after logging it but before its checkpoint) counts once, from its last record."""
    by_step_rank = {}
    for log in sorted((out / "samples").glob("rank*.jsonl")):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            by_step_rank[(row["step"], row["rank"], log.name)] = row["samples"]
    return sorted(i for samples in by_step_rank.values() for i in samples)


@pytest.mark.slow
def test_resume_at_another_world_size_continues_at_the_same_sample(tmp_path, tokenized):
    two = run(train_command(tokenized, tmp_path, "train.max_steps=4", launcher=[*TORCHRUN, "--standalone", "--nproc_per_node", "2"]))
    assert "world size 2" in two.stdout
    # Same checkpoints, one process, four more steps.
    one = run(train_command(tokenized, tmp_path, "train.max_steps=8", launcher=[sys.executable]))
    assert "world size 2 -> 1" in one.stdout and "sample 32" in one.stdout
    # 4 steps x 4 x 2 ranks, then 4 steps x 4 x 1: every sample of [0, 48) exactly once.
    assert trained_samples(tmp_path / "out") == list(range(48))


@pytest.mark.slow
def test_compile_under_ddp_trains_the_eager_curve(tmp_path, tokenized):
    """`train.compile` with two DDP ranks (gloo): dynamo splits the compiled graph at DDP's gradient
    buckets so the all-reduces still overlap the backward; the losses are eager DDP's to rounding."""
    import numpy as np

    launcher = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
    common = ("train.max_steps=4", "train.log_every_steps=1", "model.dropout=0")  # compiled graphs draw other masks
    run(train_command(tokenized, tmp_path / "eager", *common, launcher=launcher))
    compiled = run(train_command(tokenized, tmp_path / "compiled", *common, "train.compile=true", launcher=launcher))
    assert "world size 2" in compiled.stdout and "compile" in compiled.stdout
    eager_losses, compiled_losses = train_losses(tmp_path / "eager" / "out"), train_losses(tmp_path / "compiled" / "out")
    assert len(compiled_losses) == 4
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)


def test_two_nodes_of_one_process_form_a_world_of_two(tmp_path, tokenized):
    port = free_port()
    launcher = lambda rank: [  # noqa: E731
        *TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
    ]
    nodes = [
        subprocess.Popen(train_command(tokenized, tmp_path, "train.max_steps=4", launcher=launcher(rank)),
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "world size 2 (backend gloo" in logs[0] + logs[1]
    stats = json.loads((tmp_path / "out" / "train_stats.json").read_text())
    assert stats["world_size"] == 2 and stats["global_batch_rows"] == 8
    assert trained_samples(tmp_path / "out") == list(range(32))


ZERO2 = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]
# A constant learning rate: the schedule must not depend on max_steps, which the interruptions change.
ZERO2_SETTINGS = ["train.strategy=deepspeed", "train.deepspeed_config=zero2", "train.warmup_steps=0", "train.min_lr_ratio=1"]


@pytest.fixture(scope="module")
def zero2_clean(tmp_path_factory, tokenized) -> Path:
    """The output folder of an uninterrupted 6-step ZeRO-2 run on 2 ranks: what each resume must reproduce."""
    root = tmp_path_factory.mktemp("zero2-clean")
    clean = run(train_command(tokenized, root, *ZERO2_SETTINGS, "train.max_steps=6", launcher=ZERO2))
    assert "strategy deepspeed" in clean.stdout
    return root / "out"


@pytest.mark.slow
def test_deepspeed_resume_from_a_kill_during_save_is_bit_identical(tmp_path, tokenized, zero2_clean):
    """Uninterrupted 6 steps vs: 4 steps, then the disk state a SIGKILL during the step-6 save
    leaves behind (the step folder renamed in but no COMPLETE marker, and a staging folder), then
    rerun. ZeRO-2 here; ZeRO-3: the real SIGKILL test below."""
    killed = tmp_path / "killed"
    run(train_command(tokenized, killed, *ZERO2_SETTINGS, "train.max_steps=4", launcher=ZERO2))
    ckpt = killed / "ckpt"
    shutil.copytree(ckpt / "step_00000004", ckpt / "step_00000006")  # half-saved: no marker
    (ckpt / "step_00000006" / "COMPLETE").unlink()
    shutil.copytree(ckpt / "step_00000004", ckpt / ".tmp_step_00000008")
    resumed = run(train_command(tokenized, killed, *ZERO2_SETTINGS, "train.max_steps=6", launcher=ZERO2))
    assert "resuming from" in resumed.stdout and "step_00000004" in resumed.stdout
    assert sha256(killed / "out/model/model.safetensors") == sha256(zero2_clean / "model/model.safetensors")
    assert train_losses(killed / "out") == train_losses(zero2_clean)


@pytest.mark.slow
def test_deepspeed_zero2_checkpoints_on_s3_resume_two_ranks_bit_identically(tmp_path, tokenized, zero2_clean, s3_bucket):
    """Each rank uploads its own ZeRO shard; the resumed run, with another machine's cache (no
    local copy of anything), downloads and loads them all (docs/clusters.md)."""
    url = f"s3://{s3_bucket}/ckpt"

    def command(steps: int) -> list[str]:
        cmd = train_command(tokenized, tmp_path, *ZERO2_SETTINGS, f"train.max_steps={steps}", launcher=ZERO2)
        cmd[cmd.index("--checkpoints") + 1] = url
        return cmd

    def on(machine: str, cmd: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, TUNEPIPE_CACHE=str(tmp_path / machine)))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    on("node-a", command(4))
    import s3fs

    shards = s3fs.S3FileSystem().glob(f"{s3_bucket}/ckpt/step_00000004/**/*optim_states.pt")
    assert len(shards) == 2, shards  # both ranks' ZeRO shards, each uploaded by its rank
    resumed = on("node-b", command(6))
    assert "resuming from" in resumed.stdout and "step_00000004" in resumed.stdout
    assert sha256(tmp_path / "out/model/model.safetensors") == sha256(zero2_clean / "model/model.safetensors")
    assert train_losses(tmp_path / "out") == train_losses(zero2_clean)


@pytest.mark.slow
def test_sigkill_under_zero3_two_ranks_resumes_to_bit_identical_weights(tmp_path):
    kill_and_resume(tmp_path, {"train.max_steps": 20, "train.nproc_per_node": 2, "train.strategy": "deepspeed", "train.deepspeed_config": "zero3"})
