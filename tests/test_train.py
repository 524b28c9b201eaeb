"""The train stage through real processes: torchrun, SIGKILL, resume, DDP on CPU with gloo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tiny import cli_args, kill_and_resume, run_cli, run_ok, sha256, summary_of, train_losses, trainer_args

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_sigkill_mid_training_under_ddp_two_ranks_resumes_to_bit_identical_weights(tmp_path):
    kill_and_resume(tmp_path, {"train.max_steps": 100, "train.nproc_per_node": 2})


@pytest.mark.slow
def test_ddp_two_ranks_on_cpu(tmp_path):
    proc = run_cli(cli_args("stage", tmp_path / "w", tmp_path / "r", "train", **{"train.nproc_per_node": 2, "train.max_steps": 10}))
    assert "world size 2 (backend gloo" in proc.stdout
    summary = summary_of(proc)
    train = next(s for s in summary["stages"] if s["name"] == "train")
    assert train["stats"]["world_size"] == 2
    assert train["stats"]["global_batch_rows"] == 8  # micro 4 x accum 1 x world 2
    losses = train_losses(train["output"])
    assert len(losses) == 10 and losses[-1] < losses[0]


@pytest.mark.slow
def test_train_by_hand_with_torchrun_resumes_from_its_checkpoints(tmp_path):
    """The documented manual launch against a committed tokenize output: 6 steps, then the same
    command told to train on to 9 resumes at step 6 and ends with the bytes of 9 straight steps."""
    tokenized = summary_of(run_cli(cli_args("stage", tmp_path / "w", tmp_path / "r", "tokenize")))["stages"][-1]["output"]
    config = tmp_path / "train.yaml"
    # A constant learning rate after warmup (min_lr_ratio 1): the schedule must not depend on
    # max_steps, which the second launch raises.
    config.write_text("model: {n_layer: 1, n_head: 2, n_embd: 32}\n"
                      "train: {max_steps: 6, save_every_steps: 3, micro_batch_size: 2, warmup_steps: 2, min_lr_ratio: 1}\n")
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "pipeline.train"]
    run_ok([*torchrun, *trainer_args(tokenized, tmp_path / "resumed", config=config)], timeout=300)
    assert sorted(p.name for p in (tmp_path / "resumed" / "ckpt").glob("step_*")) == ["step_00000003", "step_00000006"]

    again = run_ok([*torchrun, *trainer_args(tokenized, tmp_path / "resumed", "train.max_steps=9", config=config)], timeout=300)
    assert "resuming from" in again.stdout and "step 6" in again.stdout
    straight = run_ok([*torchrun, *trainer_args(tokenized, tmp_path / "straight", "train.max_steps=9", config=config)], timeout=300)
    assert "resuming from" not in straight.stdout

    resumed_out, straight_out = tmp_path / "resumed" / "out", tmp_path / "straight" / "out"
    assert sha256(resumed_out / "model" / "model.safetensors") == sha256(straight_out / "model" / "model.safetensors")
    assert train_losses(resumed_out) == train_losses(straight_out) and len(train_losses(resumed_out)) == 9
    stats = [json.loads((out / "train_stats.json").read_text()) for out in (resumed_out, straight_out)]
    assert [(s["resumed_from_step"], s["steps"]) for s in stats] == [(6, 9), (0, 9)]
    assert sorted(p.name for p in (tmp_path / "resumed" / "ckpt").glob("step_*")) == ["step_00000006", "step_00000009"]
    assert sorted(p.name for p in (tmp_path / "resumed" / "ckpt").iterdir() if not p.name.startswith("step_")) == [".lock"]

